//! The SNP fuzz bodies: [`snp_report`] (a report, verified against a real AMD chain) and
//! [`vek_cert`] (a VCEK/VLEK certificate, verified against a real report and AMD's ASK/ARK).
//!
//! Both get the real vectors from the harness as [`SnpSamples`] (each a real report, its chain,
//! a policy it passes and a time inside its certificates' validity); the first input byte picks
//! the sample, the rest is the fuzzed part. Invariants:
//! - [`snp_report`]: the report parser's accessors, descriptions and reserved ranges stay within
//!   the 1184 bytes; a TCB field decodes and re-encodes to itself with its reserved bytes
//!   cleared; aws-lc-rs's ECDSA verdict (the one the verifier uses) agrees with RustCrypto
//!   `p384`'s on the report's signature and signed bytes; and a report the verifier accepts under the
//!   sample's chain has exactly the sample's signed bytes (only the signature encoding may
//!   differ: ECDSA is malleable) and reports its fields as the bytes say.
//! - [`vek_cert`]: certificate loading, extension reading and chain helpers return errors, not
//!   panics; a certificate the verifier accepts in place of the sample's VCEK/VLEK has the same
//!   `tbsCertificate` (AMD's signature covers it); an evidence bundle that parses as JSON
//!   prints as JSON that parses to the same bundle.

use std::time::SystemTime;

use aws_lc_rs::signature::ParsedPublicKey;
use der::{Decode, Encode};
use p384::ecdsa::signature::hazmat::PrehashVerifier;
use sha2::{Digest, Sha384};
use x509_cert::Certificate;

use crate::evidence::certs::{self, VekExtensions};
use crate::evidence::report::{offset, Report, TcbLayout, TcbVersion, REPORT_LEN, SIGNED_LEN};
use crate::evidence::{CertRole, EvidenceBundle, EvidencePolicy, Expected, Verifier};

/// One real report with its chain, a policy it passes and a time inside its validity.
#[derive(Debug, Clone)]
pub struct SnpSample {
    /// For messages.
    pub name: String,
    /// The report and its chain.
    pub bundle: EvidenceBundle,
    /// A policy the report passes.
    pub policy: EvidencePolicy,
    /// A time inside every certificate's validity.
    pub now: SystemTime,
}

/// A sample with its VEK's public key, parsed by aws-lc-rs and by `p384`.
type Sample = (SnpSample, ParsedPublicKey, p384::ecdsa::VerifyingKey);

/// The samples, with a verifier whose chain cache and key tables are already built (so that
/// the bodies' heap use is their own).
#[derive(Debug)]
pub struct SnpSamples {
    samples: Vec<Sample>,
    verifier: Verifier,
}

impl SnpSamples {
    /// Checks that every sample verifies (panics naming one that does not) and warms the caches.
    pub fn new(samples: Vec<SnpSample>) -> SnpSamples {
        assert!(!samples.is_empty(), "no SNP samples");
        let verifier = Verifier::new();
        let samples = samples
            .into_iter()
            .map(|s| {
                if let Err(e) =
                    verifier.verify_at(&s.bundle, &s.policy, &Expected::default(), s.now)
                {
                    panic!("SNP sample {} does not verify: {e}", s.name);
                }
                let cert = Certificate::from_der(&s.bundle.vek).expect("a verified VEK parses");
                let aws = certs::vek_public_key(&cert).expect("a verified VEK has a P-384 key");
                let rc = p384::ecdsa::VerifyingKey::from_sec1_bytes(certs::spki_bits(&cert))
                    .expect("a verified VEK's key is a P-384 point");
                (s, aws, rc)
            })
            .collect();
        SnpSamples { samples, verifier }
    }

    fn pick<'s, 'd>(&'s self, data: &'d [u8]) -> Option<(&'s Sample, &'d [u8])> {
        let (sel, rest) = data.split_first()?;
        Some((&self.samples[usize::from(*sel) % self.samples.len()], rest))
    }
}

/// Fuzz body: a report (after the sample selector byte); see the module docs.
pub fn snp_report(data: &[u8], samples: &SnpSamples) {
    let Some(((sample, aws, rc), bytes)) = samples.pick(data) else { return };
    if let Ok(report) = Report::parse(bytes) {
        parsed_report(&report);
        signature_agrees(&report, aws, rc);
    }
    let bundle = EvidenceBundle { report: bytes.to_vec(), ..sample.bundle.clone() };
    let Ok(v) =
        samples.verifier.verify_at(&bundle, &sample.policy, &Expected::default(), sample.now)
    else {
        return;
    };
    assert_eq!(
        bytes[..SIGNED_LEN],
        sample.bundle.report[..SIGNED_LEN],
        "{}: the verifier accepted a report whose signed bytes differ",
        sample.name
    );
    assert_eq!(v.report_data.0[..], bytes[offset::REPORT_DATA..offset::REPORT_DATA + 64]);
    assert_eq!(v.measurement.0[..], bytes[offset::MEASUREMENT..offset::MEASUREMENT + 48]);
    assert_eq!(v.host_data.0[..], bytes[offset::HOST_DATA..offset::HOST_DATA + 32]);
}

fn parsed_report(report: &Report) {
    for layout in [None, Some(TcbLayout::MilanGenoa), Some(TcbLayout::Turin)] {
        let _ = report.describe(layout);
    }
    let _ = report.product_hint().to_string();
    for layout in [TcbLayout::MilanGenoa, TcbLayout::Turin] {
        for r in report.reserved_ranges(layout) {
            assert!(r.start <= r.end && r.end <= REPORT_LEN, "reserved range {r:?}");
        }
        let _ = report.first_nonzero_reserved(layout);
        let raw = report.reported_tcb_raw();
        let mut cleared = raw;
        let reserved = match layout {
            TcbLayout::MilanGenoa => 2..6,
            TcbLayout::Turin => 4..7,
        };
        cleared[reserved].fill(0);
        assert_eq!(TcbVersion::decode(raw, layout).encode(layout), cleared, "{layout:?} TCB");
    }
}

/// The report's signature over its signed bytes, checked by both ECDSA implementations.
fn signature_agrees(report: &Report, aws: &ParsedPublicKey, rc: &p384::ecdsa::VerifyingKey) {
    let (r_le, s_le) = report.signature_le();
    if r_le[48..].iter().chain(&s_le[48..]).any(|&b| b != 0) {
        return; // not a 48-byte value: the verifier refuses it before any ECDSA
    }
    let be = |le: &[u8; 72]| -> [u8; 48] {
        let mut b: [u8; 48] = le[..48].try_into().expect("48 bytes");
        b.reverse();
        b
    };
    let (r, s) = (be(&r_le), be(&s_le));
    let mut rs = [0u8; 96];
    rs[..48].copy_from_slice(&r);
    rs[48..].copy_from_slice(&s);
    let ours = aws.verify_sig(report.signed_bytes(), &rs).is_ok();
    let digest: [u8; 48] = Sha384::digest(report.signed_bytes()).into();
    let theirs = p384::ecdsa::Signature::from_slice(&rs)
        .map(|sig| rc.verify_prehash(&digest, &sig).is_ok())
        .unwrap_or(false);
    assert_eq!(ours, theirs, "aws-lc-rs ECDSA disagrees with p384");
}

/// Fuzz body: a VCEK/VLEK certificate (after the sample selector byte); see the module docs.
pub fn vek_cert(data: &[u8], samples: &SnpSamples) {
    let Some(((sample, _, _), vek)) = samples.pick(data) else { return };
    if let Ok(text) = std::str::from_utf8(vek) {
        if let Ok(b) = EvidenceBundle::from_json(text) {
            assert_eq!(EvidenceBundle::from_json(&b.to_json()).ok(), Some(b), "bundle JSON");
        }
    }
    for der in certs::load_certificates(vek).unwrap_or_default() {
        let Ok(cert) = certs::parse(CertRole::Vek, &der) else { continue };
        let _ = VekExtensions::read(&cert);
        let _ = (certs::subject_cn(&cert), certs::spki_sha256(&cert), certs::validity(&cert));
        let _ = certs::vek_public_key(&cert);
        let _ = certs::is_self_issued(&der);
        if let Some(ask) = &sample.bundle.ask {
            let _ = certs::names_issuer_of(ask, &der);
        }
    }
    let _ = EvidenceBundle::with_builtin_chain(sample.bundle.report.clone(), vek.to_vec());
    let bundle = EvidenceBundle { vek: vek.to_vec(), ..sample.bundle.clone() };
    // A fresh verifier: a chain cached here would outlive the input.
    let accepted = Verifier::new()
        .verify_at(&bundle, &sample.policy, &Expected::default(), sample.now)
        .is_ok();
    if accepted {
        let tbs = |der: &[u8]| {
            Certificate::from_der(der).and_then(|c| c.tbs_certificate.to_der()).expect("parses")
        };
        assert_eq!(
            tbs(vek),
            tbs(&sample.bundle.vek),
            "{}: a foreign VEK was accepted",
            sample.name
        );
    }
}
