//! Hashes as Nix names, parses and prints them.
//!
//! A [`Hash`](struct@Hash) is an algorithm ([`HashAlgo`]: md5, sha1, sha256, sha512) plus its digest. Nix
//! prints digests in four encodings ([`Encoding`]): base16 (lowercase hex), nix32 (see
//! [`crate::base32`]), base64 (standard alphabet, padded) and SRI (`sha256-<base64>`).
//! When parsing `algo:digest`, the **length** of the digest decides the encoding, as in Nix.
//! [`Hasher`] hashes incrementally and implements [`std::io::Write`].
//!
//! Not here: which hash a store object must have (see [`crate::store_path`]), BLAKE3 or other
//! algorithms newer Nix versions know.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use digest::Digest;
use thiserror::Error;

use crate::base32;

/// A hash algorithm Nix supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HashAlgo {
    /// MD5 (16 bytes).
    Md5,
    /// SHA-1 (20 bytes).
    Sha1,
    /// SHA-256 (32 bytes).
    Sha256,
    /// SHA-512 (64 bytes).
    Sha512,
}

impl HashAlgo {
    /// All algorithms, in Nix's order.
    pub const ALL: [HashAlgo; 4] = [Self::Md5, Self::Sha1, Self::Sha256, Self::Sha512];

    /// The digest size in bytes.
    pub const fn size(self) -> usize {
        match self {
            Self::Md5 => 16,
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }

    /// Nix's name: `md5`, `sha1`, `sha256`, `sha512`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Md5 => "md5",
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    /// Hashes `data` in one go.
    pub fn digest(self, data: impl AsRef<[u8]>) -> Hash {
        let mut h = Hasher::new(self);
        h.update(data.as_ref());
        h.finish()
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        HashAlgo::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| HashError::UnknownAlgo(s.to_owned()))
    }
}

/// A textual encoding of a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Lowercase hexadecimal.
    Base16,
    /// Nix's base-32.
    Nix32,
    /// Standard base64 with padding.
    Base64,
    /// `algo-<base64>` (Subresource Integrity).
    Sri,
}

/// Why a hash could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HashError {
    /// Not one of md5, sha1, sha256, sha512.
    #[error("unknown hash algorithm {0:?}")]
    UnknownAlgo(String),
    /// Neither `algo:digest` nor `algo-base64`.
    #[error("hash {0:?} has no algorithm prefix (expected `algo:digest` or `algo-base64`)")]
    MissingPrefix(String),
    /// The digest length fits no encoding of the algorithm.
    #[error("{algo} hash digest {digest:?} has length {len}, which is not base16 ({b16}), nix32 ({b32}) or base64 ({b64})")]
    BadLength {
        /// The algorithm.
        algo: HashAlgo,
        /// The digest text.
        digest: String,
        /// Its length.
        len: usize,
        /// Expected base16 length.
        b16: usize,
        /// Expected nix32 length.
        b32: usize,
        /// Expected base64 length.
        b64: usize,
    },
    /// Invalid base16.
    #[error("invalid base16 {algo} digest {digest:?}")]
    BadBase16 {
        /// The algorithm.
        algo: HashAlgo,
        /// The digest text.
        digest: String,
    },
    /// Invalid nix32.
    #[error("invalid nix32 {algo} digest {digest:?}")]
    BadNix32 {
        /// The algorithm.
        algo: HashAlgo,
        /// The digest text.
        digest: String,
        /// The decoder's complaint.
        #[source]
        source: base32::Base32Error,
    },
    /// Invalid base64 or wrong decoded size.
    #[error("invalid base64 {algo} digest {digest:?}")]
    BadBase64 {
        /// The algorithm.
        algo: HashAlgo,
        /// The digest text.
        digest: String,
    },
    /// A digest of the wrong size was given to [`Hash::new`].
    #[error("{algo} digest must be {expected} bytes, got {got}")]
    WrongSize {
        /// The algorithm.
        algo: HashAlgo,
        /// Its size.
        expected: usize,
        /// The size given.
        got: usize,
    },
    /// The algorithm is not the one required.
    #[error("expected a {expected} hash, got {got}")]
    WrongAlgo {
        /// Required algorithm.
        expected: HashAlgo,
        /// Algorithm found.
        got: HashAlgo,
    },
}

const B64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A digest with its algorithm.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash {
    algo: HashAlgo,
    digest: Vec<u8>,
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({}:{})", self.algo, self.to_base16())
    }
}

impl Hash {
    /// A hash from raw digest bytes; the size must match the algorithm.
    pub fn new(algo: HashAlgo, digest: &[u8]) -> Result<Self, HashError> {
        if digest.len() != algo.size() {
            return Err(HashError::WrongSize { algo, expected: algo.size(), got: digest.len() });
        }
        Ok(Self { algo, digest: digest.to_vec() })
    }

    /// A SHA-256 hash from its 32 bytes.
    pub fn sha256(digest: [u8; 32]) -> Self {
        Self { algo: HashAlgo::Sha256, digest: digest.to_vec() }
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The raw digest.
    pub fn digest(&self) -> &[u8] {
        &self.digest
    }

    /// The digest as 32 bytes if this is SHA-256.
    pub fn sha256_bytes(&self) -> Result<[u8; 32], HashError> {
        if self.algo != HashAlgo::Sha256 {
            return Err(HashError::WrongAlgo { expected: HashAlgo::Sha256, got: self.algo });
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(&self.digest);
        Ok(out)
    }

    /// Lowercase hex digest, without prefix.
    pub fn to_base16(&self) -> String {
        hex::encode(&self.digest)
    }

    /// nix32 digest, without prefix.
    pub fn to_nix32(&self) -> String {
        base32::encode(&self.digest)
    }

    /// Padded base64 digest, without prefix.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(&self.digest)
    }

    /// `algo-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, self.to_base64())
    }

    /// The digest in `enc`; with `prefixed`, `algo:` is put in front (SRI always has its prefix).
    pub fn encode(&self, enc: Encoding, prefixed: bool) -> String {
        let body = match enc {
            Encoding::Base16 => self.to_base16(),
            Encoding::Nix32 => self.to_nix32(),
            Encoding::Base64 => self.to_base64(),
            Encoding::Sri => return self.to_sri(),
        };
        if prefixed {
            format!("{}:{}", self.algo, body)
        } else {
            body
        }
    }

    /// Parses a digest of a known algorithm without prefix; the length decides the encoding
    /// (Nix's `Hash::parseNonSRIUnprefixed`).
    pub fn parse_digest(algo: HashAlgo, digest: &str) -> Result<Self, HashError> {
        let size = algo.size();
        let b16 = size * 2;
        let b32 = base32::encoded_len(size);
        let b64 = size.div_ceil(3) * 4;
        let bytes = if digest.len() == b16 {
            // hex::decode accepts uppercase; Nix does too.
            hex::decode(digest)
                .map_err(|_| HashError::BadBase16 { algo, digest: digest.to_owned() })?
        } else if digest.len() == b32 {
            base32::decode(digest).map_err(|source| HashError::BadNix32 {
                algo,
                digest: digest.to_owned(),
                source,
            })?
        } else if digest.len() == b64 {
            decode_b64(algo, digest, &STANDARD)?
        } else {
            return Err(HashError::BadLength {
                algo,
                digest: digest.to_owned(),
                len: digest.len(),
                b16,
                b32,
                b64,
            });
        };
        Self::new(algo, &bytes)
    }

    /// Parses SRI `algo-<base64>` (padding optional, as Nix accepts it).
    pub fn parse_sri(s: &str) -> Result<Self, HashError> {
        let (algo, digest) =
            s.split_once('-').ok_or_else(|| HashError::MissingPrefix(s.to_owned()))?;
        let algo: HashAlgo = algo.parse()?;
        let bytes = decode_b64(algo, digest, &B64_LENIENT)?;
        Self::new(algo, &bytes)
    }

    /// Parses `algo:digest` (any encoding, length decides) or SRI `algo-base64`
    /// (Nix's `Hash::parseAnyPrefixed`).
    pub fn parse_prefixed(s: &str) -> Result<Self, HashError> {
        match (s.find(':'), s.find('-')) {
            (Some(c), d) if d.is_none_or(|d| c < d) => {
                let algo: HashAlgo = s[..c].parse()?;
                Self::parse_digest(algo, &s[c + 1..])
            }
            (_, Some(_)) => Self::parse_sri(s),
            _ => Err(HashError::MissingPrefix(s.to_owned())),
        }
    }

    /// Parses either a prefixed hash or, when `algo` is given, a bare digest
    /// (Nix's `Hash::parseAny`). A prefix must agree with `algo`.
    pub fn parse_any(s: &str, algo: Option<HashAlgo>) -> Result<Self, HashError> {
        let has_prefix = s.contains(':') || s.contains('-');
        let h = match (has_prefix, algo) {
            (true, _) | (false, None) => Self::parse_prefixed(s)?,
            (false, Some(a)) => return Self::parse_digest(a, s),
        };
        match algo {
            Some(a) if a != h.algo => Err(HashError::WrongAlgo { expected: a, got: h.algo }),
            _ => Ok(h),
        }
    }
}

fn decode_b64(algo: HashAlgo, digest: &str, engine: &GeneralPurpose) -> Result<Vec<u8>, HashError> {
    let bad = || HashError::BadBase64 { algo, digest: digest.to_owned() };
    let bytes = engine.decode(digest).map_err(|_| bad())?;
    if bytes.len() != algo.size() {
        return Err(bad());
    }
    Ok(bytes)
}

/// `algo:<nix32>` (how Nix prints narHash and most hashes).
impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo, self.to_nix32())
    }
}

impl FromStr for Hash {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        Self::parse_prefixed(s)
    }
}

/// An incremental hasher for any [`HashAlgo`].
#[derive(Clone)]
pub enum Hasher {
    /// MD5 state.
    Md5(md5::Md5),
    /// SHA-1 state.
    Sha1(sha1::Sha1),
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// SHA-512 state.
    Sha512(sha2::Sha512),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hasher({})", self.algo())
    }
}

impl Hasher {
    /// A fresh hasher.
    pub fn new(algo: HashAlgo) -> Self {
        match algo {
            HashAlgo::Md5 => Self::Md5(md5::Md5::new()),
            HashAlgo::Sha1 => Self::Sha1(sha1::Sha1::new()),
            HashAlgo::Sha256 => Self::Sha256(sha2::Sha256::new()),
            HashAlgo::Sha512 => Self::Sha512(sha2::Sha512::new()),
        }
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        match self {
            Self::Md5(_) => HashAlgo::Md5,
            Self::Sha1(_) => HashAlgo::Sha1,
            Self::Sha256(_) => HashAlgo::Sha256,
            Self::Sha512(_) => HashAlgo::Sha512,
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Self::Md5(h) => h.update(data),
            Self::Sha1(h) => h.update(data),
            Self::Sha256(h) => h.update(data),
            Self::Sha512(h) => h.update(data),
        }
    }

    /// The final hash.
    pub fn finish(self) -> Hash {
        let (algo, digest) = match self {
            Self::Md5(h) => (HashAlgo::Md5, h.finalize().to_vec()),
            Self::Sha1(h) => (HashAlgo::Sha1, h.finalize().to_vec()),
            Self::Sha256(h) => (HashAlgo::Sha256, h.finalize().to_vec()),
            Self::Sha512(h) => (HashAlgo::Sha512, h.finalize().to_vec()),
        };
        Hash { algo, digest }
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// SHA-256 of `data` as raw bytes.
pub fn sha256(data: impl AsRef<[u8]>) -> [u8; 32] {
    sha2::Sha256::digest(data.as_ref()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn encodings_of_empty_sha256() {
        let h = HashAlgo::Sha256.digest(b"");
        assert_eq!(h.to_base16(), EMPTY_SHA256);
        assert_eq!(h.to_string(), "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(h.to_sri(), "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=");
        for s in [
            format!("sha256:{EMPTY_SHA256}"),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73".into(),
            "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU".into(),
        ] {
            assert_eq!(s.parse::<Hash>().unwrap(), h, "{s}");
        }
        let md5 = HashAlgo::Md5.digest(b"");
        assert_eq!(md5.to_nix32(), "3y8bwfr609h3lh9ch0izcqq7fl");
    }

    #[test]
    fn errors_name_the_problem() {
        let e = "sha257:abc".parse::<Hash>().unwrap_err();
        assert_eq!(e, HashError::UnknownAlgo("sha257".into()));
        let e = "sha256:abc".parse::<Hash>().unwrap_err();
        assert!(matches!(e, HashError::BadLength { len: 3, .. }), "{e}");
        assert!(e.to_string().contains("length 3"));
        let e = Hash::parse_digest(HashAlgo::Md5, "3y8bwfr609h3lh9ch0izcqq7fe").unwrap_err();
        assert!(matches!(e, HashError::BadNix32 { .. }));
        assert!(matches!("abc".parse::<Hash>().unwrap_err(), HashError::MissingPrefix(_)));
        assert!(matches!(
            Hash::parse_any("md5:3y8bwfr609h3lh9ch0izcqq7fl", Some(HashAlgo::Sha1)),
            Err(HashError::WrongAlgo { .. })
        ));
    }

    #[test]
    fn incremental_matches_one_shot() {
        for algo in HashAlgo::ALL {
            let mut h = Hasher::new(algo);
            h.update(b"hello ");
            h.update(b"world");
            assert_eq!(h.finish(), algo.digest(b"hello world"));
        }
    }

    proptest! {
        #[test]
        fn round_trip_every_encoding(algo_i in 0usize..4, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let h = HashAlgo::ALL[algo_i].digest(&data);
            for enc in [Encoding::Base16, Encoding::Nix32, Encoding::Base64, Encoding::Sri] {
                let s = h.encode(enc, true);
                prop_assert_eq!(&s.parse::<Hash>().unwrap(), &h);
                if enc != Encoding::Sri {
                    let bare = h.encode(enc, false);
                    prop_assert_eq!(&Hash::parse_digest(h.algo(), &bare).unwrap(), &h);
                }
            }
        }
    }
}
