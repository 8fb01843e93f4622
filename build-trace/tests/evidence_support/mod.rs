//! Shared helpers for the evidence tests: the real AMD vectors in `shared/testdata/snp`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::SystemTime;

use build_trace::evidence::certs::{builtin_ark, builtin_ask, load_certificates, parse_time};
use build_trace::evidence::{EvidenceBundle, EvidencePolicy, Product};

/// `$VOUCH_SNP_TESTDATA`, else `<workspace>/../shared/testdata/snp`.
pub fn testdata() -> PathBuf {
    if let Some(dir) = std::env::var_os("VOUCH_SNP_TESTDATA") {
        return PathBuf::from(dir);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/snp");
    assert!(
        dir.join("README.md").exists(),
        "real SNP test vectors not found at {} (set VOUCH_SNP_TESTDATA)",
        dir.display()
    );
    dir
}

pub fn read(rel: &str) -> Vec<u8> {
    let path = testdata().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// All certificates (DER) of a file, in file order.
pub fn certs(rel: &str) -> Vec<Vec<u8>> {
    load_certificates(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

pub fn at(s: &str) -> SystemTime {
    parse_time(s).unwrap()
}

/// A time inside the validity of every real VCEK (the Turin VCEK starts 2026-02-05).
pub fn when() -> SystemTime {
    at("2026-06-01T00:00:00Z")
}

/// A time inside the real VLEK's validity (2024-12-10..2025-12-10).
pub fn vlek_when() -> SystemTime {
    at("2025-06-01T00:00:00Z")
}

/// One real report with its certificates and the policy written for it.
pub struct RealCase {
    pub name: &'static str,
    pub product: Product,
    pub bundle: EvidenceBundle,
    pub policy: EvidencePolicy,
    pub measurement: &'static str,
    pub report_data: [u8; 64],
    pub host_data: [u8; 32],
    /// The injected "now": inside every certificate's validity.
    pub now: SystemTime,
}

fn bundle(report: &str, vek: Vec<u8>, ask: Vec<u8>, ark: Vec<u8>) -> EvidenceBundle {
    EvidenceBundle {
        report: read(report),
        vek,
        ask: Some(ask),
        ark,
        provider: Some("sev_guest".into()),
    }
}

fn policy_toml(text: &str) -> EvidencePolicy {
    EvidencePolicy::from_toml(text).unwrap_or_else(|e| panic!("test policy: {e}"))
}

/// Every real AMD-signed report of the test data, each with a policy written for it.
pub fn real_cases() -> Vec<RealCase> {
    let mut cases = Vec::new();
    let rd = |r: &str| -> [u8; 64] {
        let b = read(r);
        b[0x50..0x90].try_into().unwrap()
    };
    let hd = |r: &str| -> [u8; 32] {
        let b = read(r);
        b[0xC0..0xE0].try_into().unwrap()
    };
    let milan_chain = certs("virtee-sev/cert_chain_milan"); // ASK, ARK
                                                            // 1. virtee: Milan v2.
    let r = "virtee-sev/report_milan.bin";
    let m = "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f";
    cases.push(RealCase {
        name: "virtee report_milan (Milan v2)",
        product: Product::Milan,
        bundle: bundle(r, read("virtee-sev/vcek_milan.der"), milan_chain[0].clone(), milan_chain[1].clone()),
        policy: policy_toml(&format!(
            "products = [\"Milan\"]\nmeasurements = [\"{m}\"]\n[min_tcb.Milan]\nbootloader = 3\ntee = 0\nsnp = 8\nmicrocode = 115\n"
        )),
        measurement: m,
        report_data: rd(r),
        host_data: hd(r),
        now: when(),
    });
    // 2. go-sev-guest: Milan v2 with DEBUG=1: needs a policy that allows debugging.
    let r = "go-sev-guest/attestation.bin";
    let m = "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01";
    let chain = certs("go-sev-guest/milan.testcer");
    cases.push(RealCase {
        name: "go-sev-guest attestation.bin (Milan v2, DEBUG)",
        product: Product::Milan,
        bundle: bundle(r, read("go-sev-guest/vcek.testcer"), chain[0].clone(), chain[1].clone()),
        policy: policy_toml(&format!(
            "products = [\"Milan\"]\nmeasurements = [\"{m}\"]\n[guest_policy]\nallow_debug = true\n[min_tcb.Milan]\nbootloader = 2\nsnp = 5\nmicrocode = 68\n"
        )),
        measurement: m,
        report_data: rd(r),
        host_data: hd(r),
        now: when(),
    });
    // 3. trustee: Milan v2, policy 0x3001F (ABI 0.31).
    let r = "trustee/test-report.bin";
    let m = "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c23500644e0e692e6be917f9050d3d38c";
    cases.push(RealCase {
        name: "trustee test-report (Milan v2)",
        product: Product::Milan,
        bundle: bundle(r, read("trustee/test-vcek.der"), builtin_ask(Product::Milan), builtin_ark(Product::Milan)),
        policy: policy_toml(&format!(
            "products = [\"Milan\"]\nmeasurements = [\"{m}\"]\n[guest_policy]\nmin_abi_major = 0\nmin_abi_minor = 31\n"
        )),
        measurement: m,
        report_data: rd(r),
        host_data: hd(r),
        now: when(),
    });
    // 4. trustee: AWS VLEK, Milan v3, VMPL 1, CHIP_ID masked.
    let r = "trustee/test-vlek-report.bin";
    let m = "8922ebbdd00ec2c541f36a6e7a82a8773a7accb451ed67bc94e740dbe92c93c4e8c9af857f5ceeb5a493df2a570d7bf0";
    let chain = certs("go-sev-guest/milanvlek.testcer"); // ASVK, ARK
    cases.push(RealCase {
        name: "trustee test-vlek-report (Milan v3, VLEK, VMPL 1)",
        product: Product::Milan,
        bundle: bundle(r, read("trustee/test-vlek.der"), chain[0].clone(), chain[1].clone()),
        policy: policy_toml(&format!(
            "products = [\"Milan\"]\nallow_vlek = true\nvmpl = 1\nmeasurements = [\"{m}\"]\n[min_tcb.Milan]\nbootloader = 4\nsnp = 24\nmicrocode = 217\n"
        )),
        measurement: m,
        report_data: rd(r),
        host_data: hd(r),
        now: vlek_when(),
    });
    // 5. trustee: Azure Milan v2 (the PEM carries VCEK, ASK, ARK).
    let r = "trustee/az-milan-snp-report.bin";
    let m = "9ac48fcac8a2d88aeeff8d427ad4f2be0e3917c748a18bdf52cc317e7fe20308b459d5ef1a12e0c22944eb386d17c315";
    let chain = certs("trustee/az-milan-vcek-ask-ark.pem");
    cases.push(RealCase {
        name: "trustee az-milan (Milan v2, Azure)",
        product: Product::Milan,
        bundle: bundle(r, chain[0].clone(), chain[1].clone(), chain[2].clone()),
        policy: policy_toml(&format!("products = [\"Milan\"]\nmeasurements = [\"{m}\"]\n")),
        measurement: m,
        report_data: rd(r),
        host_data: hd(r),
        now: when(),
    });
    // 6. trustee: Azure Genoa v3.
    let r = "trustee/az-genoa-snp-report.bin";
    let m = "f57dc09a507c6ecd82369bffb600f0003792f4d99bc26e985ec0c266fc34faf3706faf814c9e61065768a6ff917c89ae";
    let chain = certs("go-sev-guest/ask_ark_genoa.pem");
    cases.push(RealCase {
        name: "trustee az-genoa (Genoa v3, Azure)",
        product: Product::Genoa,
        bundle: bundle(r, certs("trustee/az-genoa-vcek.pem")[0].clone(), chain[0].clone(), chain[1].clone()),
        policy: policy_toml(&format!(
            "products = [\"Genoa\"]\nmeasurements = [\"{m}\"]\n[min_tcb.Genoa]\nbootloader = 10\nsnp = 23\nmicrocode = 84\n"
        )),
        measurement: m,
        report_data: rd(r),
        host_data: hd(r),
        now: when(),
    });
    // 7. Microsoft TAV: Turin v5, 8-byte hwID, fmcSPL.
    let r = "microsoft-tav/turin_attestation_report.bin";
    let m = "6d6c354511d6f7c6d7504668903dc5bdc066a048b651840d8d03fb85299ebfa142fccf1d1b0baca496841bdf243619d4";
    cases.push(RealCase {
        name: "microsoft-tav turin (Turin v5)",
        product: Product::Turin,
        bundle: bundle(
            r,
            certs("microsoft-tav/turin_vcek.pem")[0].clone(),
            certs("microsoft-tav/turin_ask.pem")[0].clone(),
            certs("microsoft-tav/turin_ark.pem")[0].clone(),
        ),
        policy: policy_toml(&format!(
            "products = [\"Turin\"]\nmeasurements = [\"{m}\"]\n[min_tcb.Turin]\nfmc = 1\nbootloader = 1\ntee = 1\nsnp = 4\nmicrocode = 81\n"
        )),
        measurement: m,
        report_data: rd(r),
        host_data: hd(r),
        now: when(),
    });
    cases
}

pub fn case(name_prefix: &str) -> RealCase {
    real_cases().into_iter().find(|c| c.name.starts_with(name_prefix)).expect("known case")
}
