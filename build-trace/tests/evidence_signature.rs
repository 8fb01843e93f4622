//! The report signature and the VCEK key at the edges, on the real AMD vectors: r and s outside
//! `1..n`, the malleable `(r, n − s)` twin, swapped scalars, and VCEK keys that are not points
//! of P-384 (off the curve, compressed, another curve, the identity).

mod evidence_support;

use build_trace::evidence::certs;
use build_trace::evidence::report::offset;
use build_trace::evidence::{Check, EvidenceBundle, EvidenceError, Expected, Verifier};
use der::{Decode, Encode};
use evidence_support::*;

/// The order n of P-384's group, big-endian (SEC 2 §2.5.1).
const N: [u8; 48] = hex_literal(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973",
);

const fn hex_literal(s: &str) -> [u8; 48] {
    let b = s.as_bytes();
    let mut out = [0u8; 48];
    let mut i = 0;
    while i < 48 {
        out[i] = (nibble(b[2 * i]) << 4) | nibble(b[2 * i + 1]);
        i += 1;
    }
    out
}

const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        _ => c - b'a' + 10,
    }
}

/// A scalar field of the report (72 bytes little-endian, value in the low 48), big-endian.
fn scalar(report: &[u8], at: usize) -> [u8; 48] {
    std::array::from_fn(|i| report[at + 47 - i])
}

fn set_scalar(report: &mut [u8], at: usize, be: &[u8; 48]) {
    for (i, b) in be.iter().enumerate() {
        report[at + 47 - i] = *b;
    }
}

/// `a − b` for big-endian 384-bit integers with `a ≥ b`.
fn sub(a: &[u8; 48], b: &[u8; 48]) -> [u8; 48] {
    let mut out = [0u8; 48];
    let mut borrow = 0i16;
    for i in (0..48).rev() {
        let d = a[i] as i16 - b[i] as i16 - borrow;
        borrow = (d < 0) as i16;
        out[i] = d.rem_euclid(256) as u8;
    }
    assert_eq!(borrow, 0);
    out
}

fn verify(c: &RealCase, b: &EvidenceBundle) -> Result<(), EvidenceError> {
    let want = Expected { host_data: Some(c.host_data), report_data: Some(c.report_data) };
    Verifier::new().verify_at(b, &c.policy, &want, c.now).map(|_| ())
}

fn with_scalars(c: &RealCase, r: &[u8; 48], s: &[u8; 48]) -> EvidenceBundle {
    let mut b = c.bundle.clone();
    set_scalar(&mut b.report, offset::SIGNATURE_R, r);
    set_scalar(&mut b.report, offset::SIGNATURE_S, s);
    b
}

#[test]
fn report_signature_scalars_outside_1_to_n_are_rejected() {
    let mut one = [0u8; 48];
    one[47] = 1;
    let max = [0xFFu8; 48];
    for c in real_cases() {
        let r = scalar(&c.bundle.report, offset::SIGNATURE_R);
        let s = scalar(&c.bundle.report, offset::SIGNATURE_S);
        verify(&c, &with_scalars(&c, &r, &s)).unwrap();
        let n_plus_r = {
            // r + n does not fit 384 bits for a real r; n + 1 does.
            let mut v = N;
            v[47] += 1;
            v
        };
        for (what, r2, s2) in [
            ("r = 0", [0u8; 48], s),
            ("s = 0", r, [0u8; 48]),
            ("r = n", N, s),
            ("s = n", r, N),
            ("r = n + 1", n_plus_r, s),
            ("s = n + 1", r, n_plus_r),
            ("r = 2^384 - 1", max, s),
            ("s = 2^384 - 1", r, max),
            ("r = 1", one, s),
            ("r and s swapped", s, r),
            // r ≡ r + n would be the same residue; n - r is not.
            ("r = n - r", sub(&N, &r), s),
        ] {
            let e = fails(verify(&c, &with_scalars(&c, &r2, &s2)), Check::ReportSignature);
            assert!(matches!(e, EvidenceError::ReportSignature(_)), "{} {what}: {e}", c.name);
        }
    }
}

/// ECDSA is malleable: `(r, n − s)` verifies whenever `(r, s)` does. AMD firmware does not
/// normalise s, so the verifier accepts both (the signature is not part of any identity: the
/// trace is keyed by the statement, and REPORT_DATA binds it).
#[test]
fn the_malleable_twin_signature_verifies() {
    for c in real_cases() {
        let r = scalar(&c.bundle.report, offset::SIGNATURE_R);
        let s = scalar(&c.bundle.report, offset::SIGNATURE_S);
        verify(&c, &with_scalars(&c, &r, &sub(&N, &s)))
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    }
}

/// A copy of a certificate with another subjectPublicKey (and curve, when given).
fn with_key(der_bytes: &[u8], key: &[u8], curve: Option<&str>) -> x509_cert::Certificate {
    let mut cert = x509_cert::Certificate::from_der(der_bytes).unwrap();
    let spki = &mut cert.tbs_certificate.subject_public_key_info;
    spki.subject_public_key = der::asn1::BitString::from_bytes(key).unwrap();
    if let Some(oid) = curve {
        let oid = der::asn1::ObjectIdentifier::new_unwrap(oid);
        spki.algorithm.parameters = Some(der::Any::encode_from(&oid).unwrap());
    }
    cert
}

#[test]
fn vcek_keys_that_are_not_p384_points_are_rejected() {
    for c in real_cases() {
        let vek = x509_cert::Certificate::from_der(&c.bundle.vek).unwrap();
        let point = certs::spki_bits(&vek).to_vec();
        assert_eq!((point.len(), point[0]), (97, 0x04), "{}", c.name);
        certs::vek_public_key(&vek).unwrap();

        let mut off_curve = point.clone();
        off_curve[96] ^= 1;
        let mut compressed = vec![0x02 | (point[96] & 1)];
        compressed.extend_from_slice(&point[1..49]);
        // A valid P-256 point (the generator), once under P-384's OID and once under P-256's.
        let p256_g = hex::decode(concat!(
            "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296",
            "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5"
        ))
        .unwrap();
        for (what, cert) in [
            ("y flipped: off the curve", with_key(&c.bundle.vek, &off_curve, None)),
            ("compressed point", with_key(&c.bundle.vek, &compressed, None)),
            ("the identity", with_key(&c.bundle.vek, &[0x00], None)),
            ("a P-256 point named P-384", with_key(&c.bundle.vek, &p256_g, None)),
            ("a P-256 key", with_key(&c.bundle.vek, &p256_g, Some("1.2.840.10045.3.1.7"))),
            ("x and y zero", with_key(&c.bundle.vek, &[[4u8].as_slice(), &[0; 96]].concat(), None)),
        ] {
            assert!(certs::vek_public_key(&cert).is_err(), "{} {what}: accepted", c.name);
            // In a bundle the changed VCEK no longer carries the ASK's signature.
            let mut b = c.bundle.clone();
            b.vek = cert.to_der().unwrap();
            fails(verify(&c, &b), Check::VekSignature);
        }
    }
}
