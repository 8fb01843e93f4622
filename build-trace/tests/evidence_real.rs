//! Evidence verification on every real AMD-signed report in `test-support/data/snp` (positive,
//! each under a policy written for it), and the checks that real data can exercise without
//! re-signing: chain, certificate extensions, signature, validity, product, root, reserved
//! bytes after the signature, and the DEBUG-policy report.

mod evidence_support;

use build_trace::evidence::certs::{self, builtin_ark, builtin_ask, spki_sha256, AMD_ROOT_PINS};
use build_trace::evidence::report::offset;
use build_trace::evidence::{
    Check, EvidenceBundle, EvidenceError, EvidencePolicy, Expected, Hex, Product, Report, Root,
    Signer, Verifier,
};
use der::{Decode, Encode};
use evidence_support::*;
use sha2::{Digest, Sha256};

fn expected(c: &RealCase) -> Expected {
    Expected { host_data: Some(c.host_data), report_data: Some(c.report_data) }
}

fn verify(
    c: &RealCase,
    bundle: &EvidenceBundle,
    policy: &EvidencePolicy,
) -> Result<(), EvidenceError> {
    Verifier::new().verify_at(bundle, policy, &expected(c), c.now).map(|_| ())
}

#[test]
fn every_real_report_verifies_under_its_policy() {
    let cases = real_cases();
    assert_eq!(cases.len(), 7, "every real report of the test data");
    let verifier = Verifier::new();
    for c in &cases {
        let mut passed = Vec::new();
        let mut obs = |check: Check, _: String| passed.push(check);
        let v = verifier
            .inspect(&c.bundle, &c.policy, &expected(c), c.now, Some(&mut obs))
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(v.root, Root::Amd { product: c.product }, "{}", c.name);
        assert!(!v.is_simulated());
        assert_eq!(v.measurement.to_string(), c.measurement, "{}", c.name);
        assert_eq!(v.report_data.0, c.report_data);
        assert_eq!(v.host_data.0, c.host_data);
        assert_eq!(passed.len(), 19, "{}: every check reported: {passed:?}", c.name);
        assert!(v.to_string().starts_with("AMD SEV-SNP evidence"), "{v}");
        // Second verification of the same chain hits the cache and gives the same answer.
        let again = verifier.verify_at(&c.bundle, &c.policy, &expected(c), c.now).unwrap();
        assert_eq!(again, v);
    }
}

#[test]
fn signer_is_the_chip_or_the_vlek_for_masked_chips() {
    for c in real_cases() {
        let v = Verifier::new().verify_at(&c.bundle, &c.policy, &expected(&c), c.now).unwrap();
        match v.signer {
            Signer::Vlek(key) => {
                assert!(c.name.contains("VLEK"));
                let vlek = x509_cert::Certificate::from_der(&c.bundle.vek).unwrap();
                assert_eq!(key.0, spki_sha256(&vlek));
                assert_eq!(v.csp_id.as_deref(), Some("CN=cc-us-east-2.amazonaws.com"));
            }
            Signer::Chip(chip) => {
                assert_eq!(chip.0, Report::parse(&c.bundle.report).unwrap().chip_id())
            }
            Signer::SimulatedChip(_) => panic!("real evidence is never simulated"),
        }
    }
}

#[test]
fn our_parser_agrees_with_the_sev_crate() {
    use sev::firmware::guest::AttestationReport;
    use sev::parser::ByteParser;
    for c in real_cases() {
        let ours = Report::parse(&c.bundle.report).unwrap();
        if ours.chip_id_masked() && ours.version() == 2 {
            continue; // sev refuses these; no such real report exists
        }
        let theirs = AttestationReport::from_bytes(&c.bundle.report).unwrap();
        assert_eq!(ours.version(), theirs.version);
        assert_eq!(ours.policy(), u64::from(theirs.policy));
        assert_eq!(ours.vmpl(), theirs.vmpl);
        assert_eq!(ours.measurement(), theirs.measurement);
        assert_eq!(ours.report_data(), theirs.report_data);
        assert_eq!(ours.host_data(), theirs.host_data);
        assert_eq!(ours.chip_id(), theirs.chip_id);
        let tcb = build_trace::evidence::TcbVersion::decode(
            ours.reported_tcb_raw(),
            c.product.tcb_layout(),
        );
        let t = theirs.reported_tcb;
        assert_eq!(
            (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode),
            (t.bootloader, t.tee, t.snp, t.microcode)
        );
        assert_eq!(tcb.fmc, t.fmc);
    }
}

#[test]
fn pinned_roots_are_amds() {
    // SPKI and DER SHA-256 as listed in test-support/data/snp/README.md.
    let der_pins = [
        (Product::Milan, "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd"),
        (Product::Genoa, "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1"),
        (Product::Turin, "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a"),
    ];
    for ((product, spki_pin), (p2, der_pin)) in AMD_ROOT_PINS.iter().zip(der_pins) {
        assert_eq!(*product, p2);
        let ark = builtin_ark(*product);
        assert_eq!(hex::encode(Sha256::digest(&ark)), der_pin);
        let cert = x509_cert::Certificate::from_der(&ark).unwrap();
        assert_eq!(hex::encode(spki_sha256(&cert)), *spki_pin);
        let from_testdata =
            certs(&format!("microsoft-tav/{}_ark.pem", product.name().to_lowercase()));
        assert_eq!(from_testdata[0], ark);
        assert!(!builtin_ask(*product).is_empty());
        assert!(!certs::builtin_asvk(*product).is_empty());
    }
    let asvk = certs::builtin_asvk(Product::Milan);
    assert_eq!(
        hex::encode(Sha256::digest(&asvk)),
        "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5"
    );
}

#[test]
fn builtin_chain_bundles_verify() {
    for c in real_cases() {
        let b = EvidenceBundle::with_builtin_chain(c.bundle.report.clone(), c.bundle.vek.clone())
            .unwrap();
        verify(&c, &b, &c.policy).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    }
}

#[test]
fn bundle_json_round_trips() {
    let c = case("trustee test-vlek");
    let json = c.bundle.to_json();
    assert!(json.contains("\"report\""));
    assert_eq!(EvidenceBundle::from_json(&json).unwrap(), c.bundle);
    assert!(EvidenceBundle::from_json(&json.replace("\"provider\"", "\"kind\"")).is_err());
}

#[test]
fn debug_policy_report_fails_the_default_policy() {
    let c = case("go-sev-guest");
    let e = fails(verify(&c, &c.bundle, &EvidencePolicy::default()), Check::GuestPolicy);
    assert!(matches!(e, EvidenceError::PolicyDebug { policy: 0xB0000 }), "{e}");
}

#[test]
fn vlek_needs_allow_vlek_and_a_time_inside_its_validity() {
    let c = case("trustee test-vlek");
    let mut p = c.policy.clone();
    p.allow_vlek = false;
    let e = fails(verify(&c, &c.bundle, &p), Check::SignerKind);
    assert!(matches!(e, EvidenceError::VlekNotAllowed));
    // Expired after 2025-12-10, at the real clock too, and not valid before 2024-12-10.
    let v = Verifier::new();
    let e = v.verify_at(&c.bundle, &c.policy, &expected(&c), at("2026-01-01")).unwrap_err();
    assert_eq!(e.check(), Check::Validity, "{e}");
    assert!(std::time::SystemTime::now() > at("2025-12-11"), "this machine's clock is wrong");
    let e = v.verify(&c.bundle, &c.policy, &expected(&c)).unwrap_err();
    assert_eq!(e.check(), Check::Validity, "{e}");
    let e = v.verify_at(&c.bundle, &c.policy, &expected(&c), at("2024-12-01")).unwrap_err();
    assert_eq!(e.check(), Check::Validity, "{e}");
    // The policy's archival time wins over the clock.
    let mut archival = c.policy.clone();
    archival.check_time = Some(build_trace::evidence::CheckTime(at("2025-03-01")));
    v.verify(&c.bundle, &archival, &expected(&c)).unwrap();
    // VMPL 1 is what that report carries: the default VMPL 0 rejects it.
    let mut p = c.policy.clone();
    p.vmpl = 0;
    fails(verify(&c, &c.bundle, &p), Check::Vmpl);
}

#[test]
fn vcek_outside_validity_fails() {
    let c = case("virtee");
    let e = Verifier::new()
        .verify_at(&c.bundle, &c.policy, &expected(&c), at("2023-01-01"))
        .unwrap_err();
    assert!(
        matches!(
            e,
            EvidenceError::CertificateValidity { role: build_trace::evidence::CertRole::Vek, .. }
        ),
        "{e}"
    );
    let e = Verifier::new()
        .verify_at(&c.bundle, &c.policy, &expected(&c), at("2031-01-01"))
        .unwrap_err();
    assert_eq!(e.check(), Check::Validity);
}

#[test]
fn foreign_rsa_root_is_untrusted() {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{KeyPair, RsaKeyPair, RSA_PSS_SHA384};
    let c = case("virtee");
    // A self-made RSA "ARK-Milan": same subject and PSS parameters as AMD's, own key.
    let amd = x509_cert::Certificate::from_der(&c.bundle.ark).unwrap();
    let key = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let mut tbs = amd.tbs_certificate.clone();
    let spki = key.public_key().as_der().unwrap();
    tbs.subject_public_key_info = spki::SubjectPublicKeyInfoOwned::from_der(spki.as_ref()).unwrap();
    let mut sig = vec![0u8; key.public_modulus_len()];
    let rng = aws_lc_rs::rand::SystemRandom::new();
    key.sign(&RSA_PSS_SHA384, &rng, &tbs.to_der().unwrap(), &mut sig).unwrap();
    let foreign = x509_cert::Certificate {
        tbs_certificate: tbs,
        signature_algorithm: amd.signature_algorithm.clone(),
        signature: der::asn1::BitString::from_bytes(&sig).unwrap(),
    };
    // It is a well-formed self-signed root; only the pin rejects it.
    certs::verify_rsa_pss(&foreign, &foreign).unwrap();
    let mut b = c.bundle.clone();
    b.ark = foreign.to_der().unwrap();
    let e = fails(verify(&c, &b, &c.policy), Check::Root);
    assert!(
        matches!(&e, EvidenceError::UntrustedRoot { subject, .. } if subject == "ARK-Milan"),
        "{e}"
    );
    // An AMD intermediate is not a root either.
    let mut b = c.bundle.clone();
    b.ark = c.bundle.ask.clone().unwrap();
    fails(verify(&c, &b, &c.policy), Check::Root);
}

#[test]
fn product_must_be_allowed_and_consistent() {
    let c = case("virtee");
    let mut p = c.policy.clone();
    p.products = vec![Product::Genoa, Product::Turin];
    let e = fails(verify(&c, &c.bundle, &p), Check::Root);
    assert!(matches!(e, EvidenceError::ProductNotAllowed(Product::Milan, _)));

    // Turin VCEK under the Milan chain: the Milan ASK did not sign it.
    let turin = case("microsoft-tav");
    let mut b = turin.bundle.clone();
    b.ask = Some(builtin_ask(Product::Milan));
    b.ark = builtin_ark(Product::Milan);
    let mut p = turin.policy.clone();
    p.products = Product::ALL.to_vec();
    fails(verify(&turin, &b, &p), Check::VekSignature);
    // The other real Turin VCEK, under the Milan chain: same.
    b.vek = read("virtee-sev/vcek_turin.der");
    fails(verify(&turin, &b, &p), Check::VekSignature);

    // Milan report with the Genoa chain (ASK + ARK): rejected at the VCEK signature.
    let mut b = c.bundle.clone();
    b.ask = Some(builtin_ask(Product::Genoa));
    b.ark = builtin_ark(Product::Genoa);
    fails(verify(&c, &b, &EvidencePolicy::default()), Check::VekSignature);

    // A Turin report (CPUID family 1Ah) presented with a valid Milan VCEK and chain.
    let mut b = c.bundle.clone();
    b.report = turin.bundle.report.clone();
    let e = fails(verify(&turin, &b, &EvidencePolicy::default()), Check::Product);
    assert!(matches!(e, EvidenceError::ProductMismatch { root: Product::Milan, .. }), "{e}");

    // A Milan v2 report with a (validly chained) Genoa VCEK: the chip id does not match.
    let genoa = case("trustee az-genoa");
    let mut b = genoa.bundle.clone();
    b.report = c.bundle.report.clone();
    let e = verify(&c, &b, &EvidencePolicy::default()).unwrap_err();
    assert!(matches!(e.check(), Check::TcbBinding | Check::ChipIdBinding), "{e}");
}

/// Flip one bit of the DER signature of a certificate (the last byte is signature data).
fn corrupt_signature(der_bytes: &[u8]) -> Vec<u8> {
    let mut cert = x509_cert::Certificate::from_der(der_bytes).unwrap();
    let mut sig = cert.signature.raw_bytes().to_vec();
    let last = sig.len() - 1;
    sig[last] ^= 1;
    cert.signature = der::asn1::BitString::from_bytes(&sig).unwrap();
    cert.to_der().unwrap()
}

#[test]
fn chain_signatures_are_checked() {
    for c in [case("virtee"), case("microsoft-tav"), case("trustee test-vlek")] {
        let mut b = c.bundle.clone();
        b.ark = corrupt_signature(&b.ark);
        let e = fails(verify(&c, &b, &c.policy), Check::ArkSignature);
        assert!(matches!(e, EvidenceError::ArkSignature(_)));
        let mut b = c.bundle.clone();
        b.ask = Some(corrupt_signature(b.ask.as_ref().unwrap()));
        fails(verify(&c, &b, &c.policy), Check::AskSignature);
        let mut b = c.bundle.clone();
        b.vek = corrupt_signature(&b.vek);
        fails(verify(&c, &b, &c.policy), Check::VekSignature);
        let mut b = c.bundle.clone();
        b.ask = None;
        let e = fails(verify(&c, &b, &c.policy), Check::Certificates);
        assert!(matches!(e, EvidenceError::MissingCertificate(_)));
    }
    // trustee's deliberately invalid VCEKs (fake hwID, signatures do not verify).
    let c = case("trustee test-report");
    for f in ["trustee/test-vcek-invalid-legacy.der", "trustee/test-vcek-invalid-new.der"] {
        let mut b = c.bundle.clone();
        b.vek = read(f);
        fails(verify(&c, &b, &c.policy), Check::VekSignature);
    }
    // Garbage instead of a certificate.
    let mut b = c.bundle.clone();
    b.vek = vec![0x30, 0x03, 0x02, 0x01, 0x00];
    fails(verify(&c, &b, &c.policy), Check::Certificates);
}

fn mutated(c: &RealCase, f: impl FnOnce(&mut Vec<u8>)) -> EvidenceBundle {
    let mut b = c.bundle.clone();
    f(&mut b.report);
    b
}

#[test]
fn report_format_is_checked() {
    let c = case("virtee");
    fails(verify(&c, &mutated(&c, |r| r.truncate(1000)), &c.policy), Check::ReportFormat);
    fails(verify(&c, &mutated(&c, |r| r.push(0)), &c.policy), Check::ReportFormat);
    for v in [0u32, 1, 4, 6] {
        let e = fails(
            verify(&c, &mutated(&c, |r| r[0..4].copy_from_slice(&v.to_le_bytes())), &c.policy),
            Check::ReportFormat,
        );
        assert!(e.to_string().contains("malformed"), "{e}");
    }
    let e = fails(
        verify(&c, &mutated(&c, |r| r[offset::SIG_ALGO] = 2), &c.policy),
        Check::ReportFormat,
    );
    assert!(matches!(e, EvidenceError::SignatureAlgorithm(2)));
}

#[test]
fn extension_binding_is_checked_on_real_vceks() {
    for c in [case("virtee"), case("trustee az-genoa"), case("microsoft-tav")] {
        // REPORTED_TCB: the snp SPL byte (Milan/Genoa byte 6, Turin byte 3) and the microcode byte.
        let snp = if c.product == Product::Turin { 3 } else { 6 };
        let e = fails(
            verify(&c, &mutated(&c, |r| r[offset::REPORTED_TCB + snp] ^= 1), &c.policy),
            Check::TcbBinding,
        );
        assert!(matches!(e, EvidenceError::TcbBinding { component: "snp", .. }), "{e}");
        fails(
            verify(&c, &mutated(&c, |r| r[offset::REPORTED_TCB + 7] ^= 1), &c.policy),
            Check::TcbBinding,
        );
        // CHIP_ID: first byte, and a byte past Turin's 8-byte hwID.
        fails(
            verify(&c, &mutated(&c, |r| r[offset::CHIP_ID] ^= 1), &c.policy),
            Check::ChipIdBinding,
        );
        fails(
            verify(&c, &mutated(&c, |r| r[offset::CHIP_ID + 40] ^= 1), &c.policy),
            Check::ChipIdBinding,
        );
    }
    let turin = case("microsoft-tav");
    let e = fails(
        verify(&turin, &mutated(&turin, |r| r[offset::REPORTED_TCB] ^= 1), &turin.policy),
        Check::TcbBinding,
    );
    assert!(matches!(e, EvidenceError::TcbBinding { component: "fmc", .. }), "{e}");
}

#[test]
fn key_info_must_match_the_certificate() {
    let c = case("virtee");
    // signing_key = 1 (VLEK) on a VCEK-signed report.
    let e = fails(
        verify(&c, &mutated(&c, |r| r[offset::KEY_INFO] = 0x4), &c.policy),
        Check::SignerKind,
    );
    assert!(matches!(e, EvidenceError::SigningKeyMismatch { .. }), "{e}");
    let e = fails(
        verify(&c, &mutated(&c, |r| r[offset::KEY_INFO] = 0x2), &c.policy),
        Check::SignerKind,
    );
    assert!(matches!(e, EvidenceError::MaskChipKey), "{e}");
    let v = case("trustee test-vlek");
    fails(verify(&v, &mutated(&v, |r| r[offset::KEY_INFO] = 0), &v.policy), Check::SignerKind);
}

#[test]
fn report_signature_covers_the_signed_fields() {
    for c in real_cases() {
        for off in [
            offset::POLICY,
            offset::REPORT_DATA,
            offset::MEASUREMENT,
            offset::HOST_DATA,
            offset::VMPL,
            0x29F,
        ] {
            let b = mutated(&c, |r| r[off] ^= 1);
            let e = verify(&c, &b, &c.policy).unwrap_err();
            assert_eq!(e.check(), Check::ReportSignature, "{} offset {off:#x}: {e}", c.name);
        }
        let e = fails(
            verify(&c, &mutated(&c, |r| r[offset::SIGNATURE_S + 5] ^= 1), &c.policy),
            Check::ReportSignature,
        );
        assert!(matches!(e, EvidenceError::ReportSignature(_)));
        let e = fails(
            verify(&c, &mutated(&c, |r| r[offset::SIGNATURE_R + 60] = 1), &c.policy),
            Check::ReportSignature,
        );
        assert!(matches!(e, EvidenceError::SignatureEncoding(_)));
    }
}

#[test]
fn unsigned_reserved_bytes_must_be_zero() {
    // The 368 bytes after the signature are not signed: flipping them keeps the signature valid,
    // so only the reserved-bytes check can catch it.
    for c in real_cases() {
        let e =
            fails(verify(&c, &mutated(&c, |r| r[0x400] = 0x5A), &c.policy), Check::ReservedBytes);
        assert!(matches!(e, EvidenceError::ReservedBytes { offset: 0x400, value: 0x5A }), "{e}");
    }
}

#[test]
fn measurement_host_data_and_report_data_are_checked() {
    let c = case("microsoft-tav");
    let mut p = c.policy.clone();
    p.measurements = Some(vec![Hex([0u8; 48])].into());
    fails(verify(&c, &c.bundle, &p), Check::Measurement);
    p.measurements = Some(vec![].into());
    fails(verify(&c, &c.bundle, &p), Check::Measurement);
    let v = Verifier::new();
    let mut want = expected(&c);
    want.host_data.as_mut().unwrap()[0] ^= 1;
    let e = v.verify_at(&c.bundle, &c.policy, &want, c.now).unwrap_err();
    assert_eq!(e.check(), Check::HostData);
    let mut want = expected(&c);
    want.report_data.as_mut().unwrap()[63] ^= 1;
    let e = v.verify_at(&c.bundle, &c.policy, &want, c.now).unwrap_err();
    assert_eq!(e.check(), Check::ReportData);
    // The TCB minimum of the product.
    let mut p = c.policy.clone();
    p.min_tcb.turin.as_mut().unwrap().microcode = 82;
    let e = fails(verify(&c, &c.bundle, &p), Check::MinimumTcb);
    assert!(matches!(e, EvidenceError::TcbTooLow { component: "microcode", .. }), "{e}");
}

#[test]
fn a_label_never_decides() {
    // Real evidence labelled "simulated" is still AMD evidence, classified by its root.
    let c = case("virtee");
    let mut b = c.bundle.clone();
    b.provider = Some("simulated".into());
    let v = Verifier::new().verify_at(&b, &c.policy, &expected(&c), c.now).unwrap();
    assert_eq!(v.root, Root::Amd { product: Product::Milan });
}
