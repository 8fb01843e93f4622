//! `.narinfo` files of binary caches and the store-path signature fingerprint.
//!
//! Text form, one `Key: value` per line, in Nix's order: `StorePath`, `URL`, `Compression`,
//! `FileHash`, `FileSize`, `NarHash`, `NarSize`, `References` (space-separated base names, line
//! always present), `Deriver` (base name), `System`, `Sig` (one line each), `CA`. Parsing follows
//! Nix: unknown keys are ignored, `StorePath`, `URL`, `NarHash` and a non-zero `NarSize` are
//! required; everything else is optional and printed only when present. Lines may end in CRLF;
//! any other carriage return is refused (it would not survive printing and parsing again).
//!
//! The signed fingerprint of a store path (Nix's `ValidPathInfo::fingerprint`) is
//! `1;<path>;<narHash as sha256:nix32>;<narSize>;<comma-separated full reference paths>`.
//! Not here: fetching or decompressing NARs, deciding which signatures to trust.

use std::collections::BTreeSet;

use thiserror::Error;

use crate::hash::{Hash, HashError};
use crate::signing::{count_valid, PublicKey, SecretKey, Signature, SigningError};
use crate::store_path::{StorePath, StorePathError};

/// Why a narinfo was rejected.
#[derive(Debug, Error)]
pub enum NarInfoError {
    /// A line without `": "`.
    #[error("narinfo line {line}: expected `Key: value`")]
    BadLine {
        /// 1-based line number.
        line: usize,
    },
    /// A carriage return that does not end a line (CRLF line ends are accepted).
    #[error("narinfo line {line}: a carriage return inside a line")]
    CarriageReturn {
        /// 1-based line number.
        line: usize,
    },
    /// A required key is missing.
    #[error("narinfo is missing {0}")]
    Missing(&'static str),
    /// A key appears twice (other than `Sig`).
    #[error("narinfo has {0} twice")]
    Duplicate(String),
    /// A number does not parse.
    #[error("narinfo {key}: invalid number {value:?}")]
    BadNumber {
        /// The key.
        key: &'static str,
        /// The text.
        value: String,
    },
    /// A hash does not parse.
    #[error("narinfo {key}: invalid hash")]
    Hash {
        /// The key.
        key: &'static str,
        /// Why.
        #[source]
        source: HashError,
    },
    /// A store path does not parse.
    #[error("narinfo {key}: invalid store path")]
    StorePath {
        /// The key.
        key: &'static str,
        /// Why.
        #[source]
        source: StorePathError,
    },
    /// A signature does not parse.
    #[error("narinfo Sig: invalid signature")]
    Sig(#[from] SigningError),
    /// NarSize 0 has no fingerprint.
    #[error("cannot fingerprint {0}: its NAR size is not known")]
    NoSize(StorePath),
}

/// The store-path fingerprint that narinfo and path-info signatures sign.
pub fn fingerprint(
    path: &StorePath,
    nar_hash: &Hash,
    nar_size: u64,
    refs: &BTreeSet<StorePath>,
) -> String {
    let refs: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
    format!("1;{path};{nar_hash};{nar_size};{}", refs.join(","))
}

/// A parsed `.narinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// `StorePath`.
    pub store_path: StorePath,
    /// `URL` of the (compressed) NAR, relative to the cache.
    pub url: String,
    /// `Compression` (`xz`, `zstd`, `none`, …).
    pub compression: Option<String>,
    /// `FileHash` of the compressed file.
    pub file_hash: Option<Hash>,
    /// `FileSize`.
    pub file_size: Option<u64>,
    /// `NarHash`.
    pub nar_hash: Hash,
    /// `NarSize`.
    pub nar_size: u64,
    /// `References`.
    pub references: BTreeSet<StorePath>,
    /// `Deriver`.
    pub deriver: Option<StorePath>,
    /// `System`.
    pub system: Option<String>,
    /// `Sig` lines, in file order.
    pub sigs: Vec<Signature>,
    /// `CA`, e.g. `fixed:r:sha256:<nix32>` (kept as text).
    pub ca: Option<String>,
}

impl NarInfo {
    /// Parses narinfo text.
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut n = NarInfo {
            store_path: StorePath::from_parts([0; 20], "x").expect("valid"),
            url: String::new(),
            compression: None,
            file_hash: None,
            file_size: None,
            nar_hash: Hash::sha256([0; 32]),
            nar_size: 0,
            references: BTreeSet::new(),
            deriver: None,
            system: None,
            sigs: Vec::new(),
            ca: None,
        };
        let mut seen = BTreeSet::new();
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            if line.contains('\r') {
                // `lines()` took one `\r` of a CRLF end; another would not survive printing.
                return Err(NarInfoError::CarriageReturn { line: i + 1 });
            }
            let (key, value) =
                line.split_once(": ").ok_or(NarInfoError::BadLine { line: i + 1 })?;
            if key != "Sig" && !seen.insert(key.to_owned()) {
                return Err(NarInfoError::Duplicate(key.to_owned()));
            }
            let path = |key: &'static str, v: &str| {
                StorePath::parse(v).map_err(|source| NarInfoError::StorePath { key, source })
            };
            let base = |key: &'static str, v: &str| {
                StorePath::from_base_name(v)
                    .map_err(|source| NarInfoError::StorePath { key, source })
            };
            let hash = |key: &'static str, v: &str| {
                Hash::parse_prefixed(v).map_err(|source| NarInfoError::Hash { key, source })
            };
            let num = |key: &'static str, v: &str| {
                v.parse::<u64>().map_err(|_| NarInfoError::BadNumber { key, value: v.to_owned() })
            };
            match key {
                "StorePath" => store_path = Some(path("StorePath", value)?),
                "URL" => url = Some(value.to_owned()),
                "Compression" => n.compression = Some(value.to_owned()),
                "FileHash" => n.file_hash = Some(hash("FileHash", value)?),
                "FileSize" => n.file_size = Some(num("FileSize", value)?),
                "NarHash" => nar_hash = Some(hash("NarHash", value)?),
                "NarSize" => nar_size = Some(num("NarSize", value)?),
                "References" => {
                    for r in value.split(' ').filter(|r| !r.is_empty()) {
                        n.references.insert(base("References", r)?);
                    }
                }
                "Deriver" if value != "unknown-deriver" => {
                    n.deriver = Some(base("Deriver", value)?)
                }
                "System" => n.system = Some(value.to_owned()),
                "Sig" => n.sigs.push(value.parse()?),
                "CA" => n.ca = Some(value.to_owned()),
                _ => {}
            }
        }
        n.store_path = store_path.ok_or(NarInfoError::Missing("StorePath"))?;
        n.url = url.filter(|u| !u.is_empty()).ok_or(NarInfoError::Missing("URL"))?;
        n.nar_hash = nar_hash.ok_or(NarInfoError::Missing("NarHash"))?;
        n.nar_size =
            nar_size.filter(|&s| s != 0).ok_or(NarInfoError::Missing("a non-zero NarSize"))?;
        Ok(n)
    }

    /// Prints narinfo text as Nix writes it (ending in a newline).
    pub fn to_text(&self) -> String {
        let mut s = format!("StorePath: {}\nURL: {}\n", self.store_path, self.url);
        if let Some(c) = &self.compression {
            s += &format!("Compression: {c}\n");
        }
        if let Some(h) = &self.file_hash {
            s += &format!("FileHash: {h}\n");
        }
        if let Some(z) = self.file_size {
            s += &format!("FileSize: {z}\n");
        }
        s += &format!("NarHash: {}\nNarSize: {}\n", self.nar_hash, self.nar_size);
        let refs: Vec<&str> = self.references.iter().map(StorePath::base_name).collect();
        s += &format!("References: {}\n", refs.join(" "));
        if let Some(d) = &self.deriver {
            s += &format!("Deriver: {}\n", d.base_name());
        }
        if let Some(sys) = &self.system {
            s += &format!("System: {sys}\n");
        }
        for sig in &self.sigs {
            s += &format!("Sig: {sig}\n");
        }
        if let Some(ca) = &self.ca {
            s += &format!("CA: {ca}\n");
        }
        s
    }

    /// The signed fingerprint of this path.
    pub fn fingerprint(&self) -> Result<String, NarInfoError> {
        if self.nar_size == 0 {
            return Err(NarInfoError::NoSize(self.store_path.clone()));
        }
        Ok(fingerprint(&self.store_path, &self.nar_hash, self.nar_size, &self.references))
    }

    /// Adds a signature by `key` (unless an identical one is present).
    pub fn sign(&mut self, key: &SecretKey) -> Result<(), NarInfoError> {
        let sig = key.sign(self.fingerprint()?.as_bytes());
        if !self.sigs.contains(&sig) {
            self.sigs.push(sig);
        }
        Ok(())
    }

    /// How many distinct `keys` have a valid signature here.
    pub fn count_valid_signatures(&self, keys: &[PublicKey]) -> Result<usize, NarInfoError> {
        Ok(count_valid(self.fingerprint()?.as_bytes(), &self.sigs, keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A narinfo written by Nix 2.8 (`nix copy --to file://…`).
    const REAL: &str = "StorePath: /nix/store/3zpdmql4zwd35vb44f72kfzbdxpbb8k0-ca-dep
URL: nar/0wrwaly57hw6ya3bqp1fp9pzdxd8glylqaw74xnbdjxwhvkffdy0.nar.xz
Compression: xz
FileHash: sha256:0wrwaly57hw6ya3bqp1fp9pzdxd8glylqaw74xnbdjxwhvkffdy0
FileSize: 244
NarHash: sha256:020yd27gh96srqcnlzvx04xzz8jry639j6nl8p7n98dpinkhaycj
NarSize: 544
References: 3zpdmql4zwd35vb44f72kfzbdxpbb8k0-ca-dep
Deriver: zhsg4gjq126vrmvr10kwy9az7y4wf20f-ca-dep.drv
Sig: nix-formats-test-1:E8LLAwK1x60yrXyauIe3K4DY47jpprSpav6xEN+Nzio344crZhXZ0DF0vZJmDbjFb37xV787tdtSbCwmdr+EDw==
CA: fixed:r:sha256:1vz8cn0fz489rcfp6njrjhaycap1rmf3ci8yp11fh588af9zbi1h
";
    const REAL_PK: &str = "nix-formats-test-1:9xmgR1HQVgU6Pls3OC7M/BlqrU2wQB99ttIwOqFsxVk=";

    #[test]
    fn real_narinfo_round_trips_and_verifies() {
        let n = NarInfo::parse(REAL).unwrap();
        assert_eq!(n.to_text(), REAL);
        let pk = PublicKey::parse(REAL_PK).unwrap();
        assert_eq!(n.count_valid_signatures(&[pk]).unwrap(), 1);
        assert_eq!(
            n.fingerprint().unwrap(),
            "1;/nix/store/3zpdmql4zwd35vb44f72kfzbdxpbb8k0-ca-dep;sha256:020yd27gh96srqcnlzvx04xzz8jry639j6nl8p7n98dpinkhaycj;544;/nix/store/3zpdmql4zwd35vb44f72kfzbdxpbb8k0-ca-dep"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let e = NarInfo::parse(&REAL.replace("NarSize: 544\n", "")).unwrap_err();
        assert!(e.to_string().contains("NarSize"), "{e}");
        let e = NarInfo::parse(&REAL.replace("FileSize: 244", "FileSize: x")).unwrap_err();
        assert!(matches!(e, NarInfoError::BadNumber { key: "FileSize", .. }));
        let e = NarInfo::parse(&format!("{REAL}URL: x\n")).unwrap_err();
        assert!(matches!(e, NarInfoError::Duplicate(_)));
        let e = NarInfo::parse("garbage\n").unwrap_err();
        assert!(matches!(e, NarInfoError::BadLine { line: 1 }));
    }

    /// Found by the `narinfo` fuzz target (`fuzz/seeds/narinfo/regress-bad-cr-in-value`): a value
    /// ending in `\r` before a CRLF end parsed, but printed as a line whose `\r` the next parse
    /// took for part of the line end, so the narinfo changed on its way through us.
    #[test]
    fn only_crlf_line_ends_carry_a_carriage_return() {
        let crlf = REAL.replace('\n', "\r\n");
        assert_eq!(NarInfo::parse(&crlf).unwrap().to_text(), REAL);
        for bad in ["x.nar\r\r\n", "x.nar\r", "x\r.nar\n"] {
            let text = REAL
                .replace("nar/0wrwaly57hw6ya3bqp1fp9pzdxd8glylqaw74xnbdjxwhvkffdy0.nar.xz\n", bad);
            let e = NarInfo::parse(&text).unwrap_err();
            assert!(matches!(e, NarInfoError::CarriageReturn { line: 2 }), "{bad:?}: {e}");
        }
    }

    proptest! {
        #[test]
        fn round_trip(d in any::<[u8; 20]>(), h in any::<[u8; 32]>(), size in 1u64.., nrefs in 0usize..4, seed in any::<[u8; 32]>(), ca in proptest::option::of("[a-z0-9:]{1,20}")) {
            let p = StorePath::from_parts(d, "p").unwrap();
            let mut n = NarInfo {
                store_path: p.clone(), url: "nar/x.nar".into(), compression: Some("none".into()),
                file_hash: None, file_size: Some(size), nar_hash: Hash::sha256(h), nar_size: size,
                references: (0..nrefs).map(|i| { let mut d2 = d; d2[0] ^= i as u8; StorePath::from_parts(d2, "r").unwrap() }).collect(),
                deriver: Some(StorePath::from_parts(d, "p.drv").unwrap()), system: None, sigs: vec![], ca,
            };
            let sk = SecretKey::from_seed("k", seed);
            n.sign(&sk).unwrap();
            let back = NarInfo::parse(&n.to_text()).unwrap();
            prop_assert_eq!(back.to_text(), n.to_text());
            prop_assert_eq!(&back, &n);
            prop_assert_eq!(back.count_valid_signatures(&[sk.public_key()]).unwrap(), 1);
        }
    }
}
