//! Nix's base-32 encoding ("nix32").
//!
//! Nix prints hashes in a base-32 alphabet without `e`, `o`, `u` and `t`, and reads the bits of the
//! input starting from the **last** character: the first output character carries the most
//! significant (highest-indexed) bits. The encoded length of `n` bytes is `ceil(n * 8 / 5)`.
//!
//! Decoding is strict: every character must be in the alphabet, the length must be the encoded
//! length of some byte string, and the unused high bits must be zero (Nix rejects those too).
//! This module does not know about hashes or store paths; see [`crate::hash`].

use thiserror::Error;

/// The 32 characters of Nix's base-32 alphabet, in digit order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a nix32 string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Base32Error {
    /// A character outside [`ALPHABET`].
    #[error("invalid nix32 character {found:?} at position {pos}")]
    InvalidChar {
        /// The offending character.
        found: char,
        /// Its byte position in the input.
        pos: usize,
    },
    /// The length is not `ceil(8n/5)` for any byte length `n`.
    #[error("invalid nix32 length {0}: not the encoded length of any byte string")]
    InvalidLength(usize),
    /// The high bits beyond the last byte are not zero.
    #[error("invalid nix32 string: non-zero padding bits")]
    NonZeroPadding,
}

/// The length of the nix32 encoding of `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n * 8 - 1) / 5 + 1
    }
}

/// The number of bytes a nix32 string of `len` characters decodes to (when `len` is valid).
pub const fn decoded_len(len: usize) -> usize {
    len * 5 / 8
}

/// Encodes `bytes` as nix32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = u16::from(bytes[i]) >> j;
        let hi = match bytes.get(i + 1) {
            Some(&next) => u16::from(next) << (8 - j),
            None => 0,
        };
        out.push(char::from(ALPHABET[usize::from((lo | hi) & 0x1f)]));
    }
    out
}

/// Digit value of every byte, `0xff` for bytes outside the alphabet.
pub(crate) const DIGITS: [u8; 256] = {
    let mut t = [0xff; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};

fn digit(c: u8) -> Option<u8> {
    match DIGITS[usize::from(c)] {
        0xff => None,
        d => Some(d),
    }
}

/// Decodes a nix32 string (strictly; see the module docs).
pub fn decode(s: &str) -> Result<Vec<u8>, Base32Error> {
    decode_bytes(s.as_bytes())
}

/// Decodes nix32 given as bytes (strictly; see the module docs).
pub fn decode_bytes(s: &[u8]) -> Result<Vec<u8>, Base32Error> {
    let size = decoded_len(s.len());
    if encoded_len(size) != s.len() {
        return Err(Base32Error::InvalidLength(s.len()));
    }
    let mut out = vec![0u8; size];
    decode_into(s, &mut out)?;
    Ok(out)
}

/// Decodes `s` into `out`, whose length is the decoded length of `s` (checked by the callers).
fn decode_into(s: &[u8], out: &mut [u8]) -> Result<(), Base32Error> {
    for (n, &c) in s.iter().rev().enumerate() {
        let pos = s.len() - 1 - n;
        let d = digit(c).ok_or(Base32Error::InvalidChar { found: char::from(c), pos })?;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= d << j;
        let carry = (u16::from(d) >> (8 - j)) as u8;
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry,
            None if carry != 0 => return Err(Base32Error::NonZeroPadding),
            None => {}
        }
    }
    Ok(())
}

/// Decodes a nix32 string into exactly `N` bytes.
pub fn decode_fixed<const N: usize>(s: &str) -> Result<[u8; N], Base32Error> {
    if s.len() != encoded_len(N) {
        return Err(Base32Error::InvalidLength(s.len()));
    }
    let mut out = [0u8; N];
    decode_into(s.as_bytes(), &mut out)?;
    Ok(out)
}

/// Whether `c` is a character of the nix32 alphabet.
pub fn is_nix32_char(c: u8) -> bool {
    digit(c).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vectors() {
        // sha256("") in nix32, as printed by `nix hash to-base32`.
        let empty = hex::decode("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            .unwrap();
        assert_eq!(encode(&empty), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x1f]), "0z");
        assert_eq!(decode("0z").unwrap(), vec![0x1f]);
    }

    #[test]
    fn digit_table_is_the_alphabet() {
        for c in 0..=255u8 {
            let want = ALPHABET.iter().position(|&a| a == c).map(|p| p as u8);
            assert_eq!(digit(c), want, "byte {c:#04x}");
        }
    }

    #[test]
    fn strict_errors() {
        assert_eq!(decode("0e").unwrap_err(), Base32Error::InvalidChar { found: 'e', pos: 1 });
        assert_eq!(decode("000").unwrap_err(), Base32Error::InvalidLength(3));
        // "z0": top digit 31 in a 1-byte string sets bits beyond the byte.
        assert_eq!(decode("z0").unwrap_err(), Base32Error::NonZeroPadding);
        assert!(decode_fixed::<20>("abc").is_err());
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode(&s).unwrap(), bytes);
        }

        #[test]
        fn decode_never_panics(s in "[0-9a-z]{0,60}") {
            if let Ok(v) = decode(&s) {
                prop_assert_eq!(encode(&v), s);
            }
        }
    }
}
