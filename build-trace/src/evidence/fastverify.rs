//! ECDSA P-384/SHA-384 verification with precomputed tables, for the steady state of
//! "one report signature per evidence bundle, same VCEK as last time".
//!
//! What is here: [`PrecomputedKey`], a fixed-base table for a public key Q (built once per
//! VCEK and cached with the chain), a shared table for the generator G, and [`verify_prehash`].
//! `p384` 0.13 computes `u1·G + u2·Q` with two generic constant-time scalar multiplications
//! (384 doublings each, no generator table). Verification handles only public data, so it may
//! be variable-time: with signed 5-bit windows and a table of `j·32^i·P` (j = 1..=16,
//! i = 0..=77) a scalar multiplication becomes ~78 point additions and no doublings. The table
//! stays in projective form (180 KiB per key, ~2 ms to build): `p384` 0.13 exposes no batch
//! inversion, and one inversion per entry would cost ~50 ms per key for a ~2% faster addition.
//!
//! The arithmetic is `p384`'s own (complete addition formulas, field and scalar types); only the
//! scalar-multiplication schedule is ours. Tests compare the result with `p384`'s verifier on
//! random keys, messages and forged signatures.
//!
//! What is not here: signing, or any secret-dependent code.

use std::sync::OnceLock;

use p384::elliptic_curve::bigint::U384;
use p384::elliptic_curve::ops::Reduce;
use p384::elliptic_curve::point::AffineCoordinates;
use p384::elliptic_curve::{Group, PrimeField};
use p384::{FieldBytes, ProjectivePoint, Scalar};

/// Window width in bits.
const W: usize = 5;
/// Signed digits per scalar: ⌈384 / W⌉ plus one carry digit.
const DIGITS: usize = 384_usize.div_ceil(W) + 1;
/// Table entries per window: multiples `1..=2^(W-1)`.
const PER_WINDOW: usize = 1 << (W - 1);

/// `j · 2^(W·i) · P` for every window `i` and `j` in `1..=2^(W-1)` (projective form).
#[derive(Clone)]
pub struct PrecomputedKey {
    table: Box<[ProjectivePoint]>,
}

impl std::fmt::Debug for PrecomputedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrecomputedKey").field("entries", &self.table.len()).finish()
    }
}

impl PrecomputedKey {
    /// Build the table for a public key (about 1250 point additions and 390 doublings).
    pub fn new(point: ProjectivePoint) -> PrecomputedKey {
        let mut projective: Vec<ProjectivePoint> = Vec::with_capacity(DIGITS * PER_WINDOW);
        let mut base = point;
        for _ in 0..DIGITS {
            let mut multiple = base;
            for _ in 0..PER_WINDOW {
                projective.push(multiple);
                multiple += base;
            }
            for _ in 0..W {
                base = base.double();
            }
        }
        PrecomputedKey { table: projective.into_boxed_slice() }
    }

    /// For a verifying key.
    pub fn from_verifying_key(key: &p384::ecdsa::VerifyingKey) -> PrecomputedKey {
        PrecomputedKey::new(ProjectivePoint::from(*key.as_affine()))
    }

    /// `acc += k · P`, variable time.
    fn mul_add(&self, acc: &mut ProjectivePoint, k: &Scalar) {
        for (i, &d) in recode(k).iter().enumerate() {
            if d > 0 {
                *acc += &self.table[i * PER_WINDOW + d as usize - 1];
            } else if d < 0 {
                *acc -= &self.table[i * PER_WINDOW + (-d) as usize - 1];
            }
        }
    }
}

/// The shared table for the generator G.
fn generator_table() -> &'static PrecomputedKey {
    static TABLE: OnceLock<PrecomputedKey> = OnceLock::new();
    TABLE.get_or_init(|| PrecomputedKey::new(ProjectivePoint::generator()))
}

/// Signed base-2^W digits of `k`, least significant first: `k = Σ d_i·2^(W·i)` with
/// `d_i ∈ [-2^(W-1), 2^(W-1))`.
fn recode(k: &Scalar) -> [i8; DIGITS] {
    let bytes = k.to_repr(); // big-endian
    let bit = |i: usize| -> u8 {
        if i >= 384 {
            0
        } else {
            (bytes[47 - i / 8] >> (i % 8)) & 1
        }
    };
    let mut digits = [0i8; DIGITS];
    let mut carry = 0i8;
    for (i, digit) in digits.iter_mut().take(DIGITS - 1).enumerate() {
        let window = (0..W).fold(0i8, |acc, b| acc | ((bit(i * W + b) as i8) << b));
        let v = window + carry;
        if v >= PER_WINDOW as i8 {
            *digit = v - (1 << W);
            carry = 1;
        } else {
            *digit = v;
            carry = 0;
        }
    }
    digits[DIGITS - 1] = carry;
    digits
}

/// Verify an ECDSA P-384 signature `(r, s)` (big-endian, 48 bytes each) over a SHA-384 digest
/// with a precomputed public key. Returns whether it verifies (SEC 1 §4.1.4).
pub fn verify_prehash(key: &PrecomputedKey, digest: &[u8; 48], r: &[u8; 48], s: &[u8; 48]) -> bool {
    let (Some(r), Some(s)) = (scalar_in_range(r), scalar_in_range(s)) else { return false };
    // SHA-384 output is as long as the group order: bits2int is the identity here.
    let z = <Scalar as Reduce<U384>>::reduce_bytes(&FieldBytes::from(*digest));
    let Some(s_inv) = Option::<Scalar>::from(s.invert()) else { return false };
    let u1 = z * s_inv;
    let u2 = r * s_inv;
    let mut acc = ProjectivePoint::IDENTITY;
    generator_table().mul_add(&mut acc, &u1);
    key.mul_add(&mut acc, &u2);
    if bool::from(acc.is_identity()) {
        return false;
    }
    let x = acc.to_affine().x();
    <Scalar as Reduce<U384>>::reduce_bytes(&x) == r
}

/// A scalar in `1..n`, or `None`.
fn scalar_in_range(bytes: &[u8; 48]) -> Option<Scalar> {
    let k = Option::<Scalar>::from(Scalar::from_repr(FieldBytes::from(*bytes)))?;
    (!bool::from(k.is_zero())).then_some(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p384::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
    use p384::ecdsa::{Signature, SigningKey, VerifyingKey};
    use p384::elliptic_curve::Field;
    use proptest::prelude::*;

    fn split(sig: &Signature) -> ([u8; 48], [u8; 48]) {
        let b = sig.to_bytes();
        (b[..48].try_into().unwrap(), b[48..].try_into().unwrap())
    }

    #[test]
    fn recode_reconstructs_scalar() {
        let mut rng = rand_core::OsRng;
        for _ in 0..50 {
            let k = Scalar::random(&mut rng);
            let digits = recode(&k);
            let mut acc = Scalar::ZERO;
            let radix = Scalar::from(1u64 << W);
            for &d in digits.iter().rev() {
                acc *= radix;
                let m = Scalar::from(d.unsigned_abs() as u64);
                acc = if d < 0 { acc - m } else { acc + m };
            }
            assert_eq!(acc, k);
            assert!(digits.iter().all(|&d| (-(PER_WINDOW as i8)..PER_WINDOW as i8).contains(&d)));
        }
    }

    #[test]
    fn edge_scalars() {
        let key = SigningKey::random(&mut rand_core::OsRng);
        let pk = PrecomputedKey::from_verifying_key(key.verifying_key());
        let digest = [7u8; 48];
        let (r, s) = split(&key.sign_prehash(&digest).unwrap());
        assert!(verify_prehash(&pk, &digest, &r, &s));
        let zero = [0u8; 48];
        let ones = [0xFFu8; 48];
        assert!(!verify_prehash(&pk, &digest, &zero, &s));
        assert!(!verify_prehash(&pk, &digest, &r, &zero));
        assert!(!verify_prehash(&pk, &digest, &ones, &s), "r >= n must be rejected");
        assert!(!verify_prehash(&pk, &digest, &r, &ones), "s >= n must be rejected");
        // ECDSA is malleable: (r, n - s) verifies too, in p384 and here alike.
        let neg_s = (-Option::<Scalar>::from(Scalar::from_repr(s.into())).unwrap()).to_repr();
        assert!(verify_prehash(&pk, &digest, &r, &neg_s.into()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn agrees_with_p384(seed in any::<[u8; 32]>(), digest in any::<[u8; 48]>(), flip in 0usize..(96 * 8 + 48 * 8)) {
            let mut secret = [0u8; 48];
            secret[..32].copy_from_slice(&seed);
            secret[40] |= 1;
            let key = SigningKey::from_slice(&secret).unwrap();
            let vk: VerifyingKey = *key.verifying_key();
            let pk = PrecomputedKey::from_verifying_key(&vk);
            let sig: Signature = key.sign_prehash(&digest).unwrap();
            let (r, s) = split(&sig);
            prop_assert!(verify_prehash(&pk, &digest, &r, &s));
            prop_assert!(vk.verify_prehash(&digest, &sig).is_ok());
            // One flipped bit in r, s or the digest: both verifiers must reject.
            let (mut r2, mut s2, mut d2) = (r, s, digest);
            match flip {
                f if f < 384 => r2[f / 8] ^= 1 << (f % 8),
                f if f < 768 => s2[(f - 384) / 8] ^= 1 << (f % 8),
                f => d2[(f - 768) / 8] ^= 1 << (f % 8),
            }
            let ours = verify_prehash(&pk, &d2, &r2, &s2);
            let mut both = [0u8; 96];
            both[..48].copy_from_slice(&r2);
            both[48..].copy_from_slice(&s2);
            let theirs = Signature::from_slice(&both).map(|sig| vk.verify_prehash(&d2, &sig).is_ok()).unwrap_or(false);
            prop_assert_eq!(ours, theirs);
            prop_assert!(!ours);
        }
    }
}
