//! Shared helpers for the evidence tests: the real AMD vectors (through `test_support::snp`, the
//! copy in `test-support/data/snp`), one policy written for each real report, and
//! the assertion that a verification failed at a given check.
#![allow(dead_code)]

use std::time::SystemTime;

use build_trace::evidence::certs::{builtin_ark, builtin_ask, load_certificates, parse_time};
use build_trace::evidence::{Check, EvidenceBundle, EvidenceError, EvidencePolicy, Product};

pub use test_support::snp::read;

/// All certificates (DER) of a file, in file order.
pub fn certs(rel: &str) -> Vec<Vec<u8>> {
    load_certificates(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Assert `result` failed with the given check, and return the error for closer looks.
#[track_caller]
pub fn fails(result: Result<(), EvidenceError>, check: Check) -> EvidenceError {
    match result {
        Ok(()) => panic!("expected failure at {check}, but verification passed"),
        Err(e) => {
            assert_eq!(e.check(), check, "wrong check failed: {e}");
            e
        }
    }
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

/// A real case: `report` with its certificates (VCEK or VLEK, ASK or ASVK, ARK), checked at
/// `now` under `products = [<product>]`, its measurement, and the `policy` lines after them.
#[allow(clippy::too_many_arguments)]
fn real_case(
    name: &'static str,
    product: Product,
    report: &str,
    [vek, ask, ark]: [Vec<u8>; 3],
    measurement: &'static str,
    policy: &str,
    now: SystemTime,
) -> RealCase {
    let bytes = read(report);
    let policy =
        format!("products = [\"{product}\"]\nmeasurements = [\"{measurement}\"]\n{policy}");
    RealCase {
        name,
        product,
        bundle: EvidenceBundle {
            report: bytes.clone(),
            vek,
            ask: Some(ask),
            ark,
            provider: Some("sev_guest".into()),
        },
        policy: EvidencePolicy::from_toml(&policy).unwrap_or_else(|e| panic!("{name}: {e}")),
        measurement,
        report_data: bytes[0x50..0x90].try_into().unwrap(),
        host_data: bytes[0xC0..0xE0].try_into().unwrap(),
        now,
    }
}

/// The first `N` certificates of a file.
fn first<const N: usize>(rel: &str) -> [Vec<u8>; N] {
    let mut c = certs(rel);
    c.truncate(N);
    c.try_into().unwrap_or_else(|_| panic!("{rel} has fewer than {N} certificates"))
}

/// The first certificate of each file.
fn one_each<const N: usize>(files: [&str; N]) -> [Vec<u8>; N] {
    files.map(|f| certs(f).swap_remove(0))
}

/// Every real AMD-signed report of the test data, each with a policy written for it.
pub fn real_cases() -> Vec<RealCase> {
    let [milan_ask, milan_ark] = first("virtee-sev/cert_chain_milan");
    let [go_ask, go_ark] = first("go-sev-guest/milan.testcer");
    let [asvk, vlek_ark] = first("go-sev-guest/milanvlek.testcer");
    let [genoa_ask, genoa_ark] = first("go-sev-guest/ask_ark_genoa.pem");
    vec![
        real_case(
            "virtee report_milan (Milan v2)",
            Product::Milan,
            "virtee-sev/report_milan.bin",
            [read("virtee-sev/vcek_milan.der"), milan_ask, milan_ark],
            "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f",
            "[min_tcb.Milan]\nbootloader = 3\ntee = 0\nsnp = 8\nmicrocode = 115\n",
            when(),
        ),
        // DEBUG=1: needs a policy that allows debugging.
        real_case(
            "go-sev-guest attestation.bin (Milan v2, DEBUG)",
            Product::Milan,
            "go-sev-guest/attestation.bin",
            [read("go-sev-guest/vcek.testcer"), go_ask, go_ark],
            "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01",
            "[guest_policy]\nallow_debug = true\n[min_tcb.Milan]\nbootloader = 2\nsnp = 5\nmicrocode = 68\n",
            when(),
        ),
        // Policy 0x3001F (ABI 0.31).
        real_case(
            "trustee test-report (Milan v2)",
            Product::Milan,
            "trustee/test-report.bin",
            [read("trustee/test-vcek.der"), builtin_ask(Product::Milan), builtin_ark(Product::Milan)],
            "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c23500644e0e692e6be917f9050d3d38c",
            "[guest_policy]\nmin_abi_major = 0\nmin_abi_minor = 31\n",
            when(),
        ),
        // AWS VLEK, Milan v3, VMPL 1, CHIP_ID masked.
        real_case(
            "trustee test-vlek-report (Milan v3, VLEK, VMPL 1)",
            Product::Milan,
            "trustee/test-vlek-report.bin",
            [read("trustee/test-vlek.der"), asvk, vlek_ark],
            "8922ebbdd00ec2c541f36a6e7a82a8773a7accb451ed67bc94e740dbe92c93c4e8c9af857f5ceeb5a493df2a570d7bf0",
            "allow_vlek = true\nvmpl = 1\n[min_tcb.Milan]\nbootloader = 4\nsnp = 24\nmicrocode = 217\n",
            vlek_when(),
        ),
        // Azure: the PEM carries VCEK, ASK, ARK.
        real_case(
            "trustee az-milan (Milan v2, Azure)",
            Product::Milan,
            "trustee/az-milan-snp-report.bin",
            first("trustee/az-milan-vcek-ask-ark.pem"),
            "9ac48fcac8a2d88aeeff8d427ad4f2be0e3917c748a18bdf52cc317e7fe20308b459d5ef1a12e0c22944eb386d17c315",
            "",
            when(),
        ),
        real_case(
            "trustee az-genoa (Genoa v3, Azure)",
            Product::Genoa,
            "trustee/az-genoa-snp-report.bin",
            [certs("trustee/az-genoa-vcek.pem").swap_remove(0), genoa_ask, genoa_ark],
            "f57dc09a507c6ecd82369bffb600f0003792f4d99bc26e985ec0c266fc34faf3706faf814c9e61065768a6ff917c89ae",
            "[min_tcb.Genoa]\nbootloader = 10\nsnp = 23\nmicrocode = 84\n",
            when(),
        ),
        // Microsoft TAV: Turin v5, 8-byte hwID, fmcSPL.
        real_case(
            "microsoft-tav turin (Turin v5)",
            Product::Turin,
            "microsoft-tav/turin_attestation_report.bin",
            one_each([
                "microsoft-tav/turin_vcek.pem",
                "microsoft-tav/turin_ask.pem",
                "microsoft-tav/turin_ark.pem",
            ]),
            "6d6c354511d6f7c6d7504668903dc5bdc066a048b651840d8d03fb85299ebfa142fccf1d1b0baca496841bdf243619d4",
            "[min_tcb.Turin]\nfmc = 1\nbootloader = 1\ntee = 1\nsnp = 4\nmicrocode = 81\n",
            when(),
        ),
    ]
}

pub fn case(name_prefix: &str) -> RealCase {
    real_cases().into_iter().find(|c| c.name.starts_with(name_prefix)).expect("known case")
}
