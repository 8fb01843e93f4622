//! Nix's ed25519 signing keys and detached signatures.
//!
//! Key files, as written by `nix-store --generate-binary-cache-key NAME SK PK`:
//! secret `NAME:base64(seed(32) ‖ public(32))` and public `NAME:base64(public(32))`.
//! A signature is `NAME:base64(ed25519 signature(64))` over a fingerprint string
//! (see [`crate::narinfo`] and [`crate::realisation`]). Verification is strict (rejects
//! non-canonical and small-order encodings, like libsodium's `crypto_sign_verify_detached`).
//!
//! Not here: which keys are trusted (that is a policy decision of the caller) or key storage.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use thiserror::Error;

/// Why a key or signature was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SigningError {
    /// No `name:` prefix, or an empty name.
    #[error("{what} {text:?} is not of the form NAME:BASE64 with a non-empty name")]
    NoName {
        /// Key, public key or signature.
        what: &'static str,
        /// The text (secret keys are not echoed).
        text: String,
    },
    /// The base64 part does not decode.
    #[error("{what} for {name:?} has invalid base64")]
    Base64 {
        /// Key, public key or signature.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// Wrong number of bytes.
    #[error("{what} for {name:?} must be {expected} bytes, got {got}")]
    Length {
        /// Key, public key or signature.
        what: &'static str,
        /// The name.
        name: String,
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// The public half stored in a secret key does not belong to its seed.
    #[error("secret key {0:?} is corrupt: its public half does not match its seed")]
    Mismatch(String),
    /// Not a valid curve point.
    #[error("public key {0:?} is not a valid ed25519 point")]
    BadPoint(String),
}

fn split<'a>(
    s: &'a str,
    what: &'static str,
    echo: bool,
) -> Result<(&'a str, &'a str), SigningError> {
    match s.trim_end().split_once(':') {
        Some((name, rest)) if !name.is_empty() => Ok((name, rest)),
        _ => Err(SigningError::NoName {
            what,
            text: if echo { s.to_owned() } else { "<redacted>".into() },
        }),
    }
}

fn decode<const N: usize>(
    b64: &str,
    what: &'static str,
    name: &str,
) -> Result<[u8; N], SigningError> {
    let v =
        STANDARD.decode(b64).map_err(|_| SigningError::Base64 { what, name: name.to_owned() })?;
    v.as_slice().try_into().map_err(|_| SigningError::Length {
        what,
        name: name.to_owned(),
        expected: N,
        got: v.len(),
    })
}

/// A named ed25519 secret key.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({:?}, <redacted>)", self.name)
    }
}

impl SecretKey {
    /// A fresh key from the OS random generator (like `nix-store --generate-binary-cache-key`).
    /// Only with the `keygen` feature.
    #[cfg(feature = "keygen")]
    pub fn generate(name: &str) -> Self {
        Self { name: name.to_owned(), key: SigningKey::generate(&mut rand_core::OsRng) }
    }

    /// A key from its 32-byte seed.
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Self {
        Self { name: name.to_owned(), key: SigningKey::from_bytes(&seed) }
    }

    /// Parses a secret key file's contents (`NAME:base64(64 bytes)`; trailing whitespace allowed).
    pub fn parse(s: &str) -> Result<Self, SigningError> {
        let (name, b64) = split(s, "secret key", false)?;
        let bytes: [u8; 64] = decode(b64, "secret key", name)?;
        let key = SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| SigningError::Mismatch(name.to_owned()))?;
        Ok(Self { name: name.to_owned(), key })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The secret key file's contents (`NAME:base64`), without a newline.
    pub fn to_file_string(&self) -> String {
        format!("{}:{}", self.name, STANDARD.encode(self.key.to_keypair_bytes()))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey { name: self.name.clone(), key: self.key.verifying_key() }
    }

    /// Signs `msg` (a fingerprint).
    pub fn sign(&self, msg: &[u8]) -> Signature {
        Signature { key_name: self.name.clone(), sig: self.key.sign(msg).to_bytes() }
    }
}

/// A named ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Parses `NAME:base64(32 bytes)` (trailing whitespace allowed).
    pub fn parse(s: &str) -> Result<Self, SigningError> {
        let (name, b64) = split(s, "public key", true)?;
        let bytes: [u8; 32] = decode(b64, "public key", name)?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| SigningError::BadPoint(name.to_owned()))?;
        Ok(Self { name: name.to_owned(), key })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The raw 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Whether `sig` is this key's (same name) valid signature of `msg`.
    pub fn verify(&self, msg: &[u8], sig: &Signature) -> bool {
        sig.key_name == self.name
            && self.key.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig.sig)).is_ok()
    }
}

/// `NAME:base64`.
impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.key.to_bytes()))
    }
}

impl FromStr for PublicKey {
    type Err = SigningError;
    fn from_str(s: &str) -> Result<Self, SigningError> {
        Self::parse(s)
    }
}

/// A detached signature with the name of its key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Signature {
    /// The signing key's name.
    pub key_name: String,
    /// The 64 signature bytes.
    pub sig: [u8; 64],
}

impl Signature {
    /// Parses `NAME:base64(64 bytes)`.
    pub fn parse(s: &str) -> Result<Self, SigningError> {
        let (name, b64) = split(s, "signature", true)?;
        Self::from_parts(name, b64)
    }

    /// From a key name and the base64 signature (the ≥ 2.35 structured JSON form).
    pub fn from_parts(key_name: &str, sig_b64: &str) -> Result<Self, SigningError> {
        Ok(Self { key_name: key_name.to_owned(), sig: decode(sig_b64, "signature", key_name)? })
    }

    /// The base64 signature without the name.
    pub fn sig_base64(&self) -> String {
        STANDARD.encode(self.sig)
    }
}

/// `NAME:base64`.
impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, self.sig_base64())
    }
}

impl FromStr for Signature {
    type Err = SigningError;
    fn from_str(s: &str) -> Result<Self, SigningError> {
        Self::parse(s)
    }
}

/// How many of `sigs` are valid signatures of `msg` by one of `keys` (each key counted once,
/// as Nix's `checkSignatures` does).
pub fn count_valid<'a>(
    msg: &[u8],
    sigs: impl IntoIterator<Item = &'a Signature>,
    keys: &[PublicKey],
) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    for s in sigs {
        if let Some(k) = keys.iter().find(|k| k.verify(msg, s)) {
            seen.insert(k.name.clone());
        }
    }
    seen.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// NixOS/nix `src/libstore-tests/realisation.cc` test key and vector
    /// (`data/realisation/simple-fingerprint.txt`, `simple-sig.json`).
    pub(crate) const NIX_TEST_KEY: &str = "test-key:tU7tTvLcScf8pmz/eTV0BEtLmRsPpZfKaRcd0nCN+pysBZPHSeg61/u2oc7mIOewfuAY1V1BiX32homTaDJ2Jw==";

    #[test]
    fn nix_test_vector() {
        let sk = SecretKey::parse(NIX_TEST_KEY).unwrap();
        let fp = r#"{"key":{"drvPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv","outputName":"foo"},"value":{"outPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo"}}"#;
        let sig = sk.sign(fp.as_bytes());
        assert_eq!(
            sig.to_string(),
            "test-key:WsjxK4/EI74COtzMDI+VCjQU9O4FydK0+YeY1CE5hUevogd+T+CPvNXza7oog3GTMS+ZlBwsC2S3ppwusKnJDg=="
        );
        assert!(sk.public_key().verify(fp.as_bytes(), &sig));
        assert!(!sk.public_key().verify(b"other", &sig));
        assert_eq!(SecretKey::parse(&sk.to_file_string()).unwrap().to_file_string(), NIX_TEST_KEY);
    }

    #[test]
    fn errors() {
        assert!(matches!(SecretKey::parse("nocolon"), Err(SigningError::NoName { .. })));
        assert!(matches!(SecretKey::parse(":AAAA"), Err(SigningError::NoName { .. })));
        assert!(matches!(SecretKey::parse("k:!!"), Err(SigningError::Base64 { .. })));
        assert!(matches!(
            PublicKey::parse("k:AAAA"),
            Err(SigningError::Length { expected: 32, got: 3, .. })
        ));
        // Seed of one key with the public half of another.
        let a = SecretKey::from_seed("a", [1; 32]);
        let b = SecretKey::from_seed("a", [2; 32]);
        let mut bytes = a.key.to_keypair_bytes();
        bytes[32..].copy_from_slice(&b.key.verifying_key().to_bytes());
        let bad = format!("a:{}", STANDARD.encode(bytes));
        assert_eq!(SecretKey::parse(&bad).unwrap_err(), SigningError::Mismatch("a".into()));
        // A signature under another name does not verify, even with the right bytes.
        let s = a.sign(b"m");
        let renamed = Signature { key_name: "b".into(), ..s.clone() };
        assert!(!a.public_key().verify(b"m", &renamed));
        assert_eq!(count_valid(b"m", [&s, &s, &renamed], &[a.public_key()]), 1);
    }

    proptest! {
        #[test]
        fn round_trips(seed in any::<[u8; 32]>(), name in "[a-z0-9.-]{1,20}", msg in proptest::collection::vec(any::<u8>(), 0..100)) {
            let sk = SecretKey::from_seed(&name, seed);
            let sk2 = SecretKey::parse(&sk.to_file_string()).unwrap();
            prop_assert_eq!(sk2.public_key(), sk.public_key());
            let pk = PublicKey::parse(&sk.public_key().to_string()).unwrap();
            let sig = Signature::parse(&sk.sign(&msg).to_string()).unwrap();
            prop_assert!(pk.verify(&msg, &sig));
        }
    }
}
