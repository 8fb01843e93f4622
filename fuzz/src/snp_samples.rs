//! The real AMD SEV-SNP samples the `snp_report` and `vek_cert` fuzz targets verify against:
//! one report per product and signer kind from `test-support/data/snp` (see its README for
//! provenance), each with its chain, a policy it passes and a time inside its certificates'
//! validity. Included by the fuzz crate and by `build-trace/tests/fuzz_seeds.rs` through
//! `#[path]`. The first byte of a fuzz input picks the sample (modulo their number), in this
//! order.

use build_trace::evidence::certs::{load_certificates, parse_time};
use build_trace::evidence::{EvidenceBundle, EvidencePolicy};
use build_trace::fuzzing::evidence::{SnpSample, SnpSamples};
use test_support::snp::read;

fn certs(rel: &str) -> Vec<Vec<u8>> {
    load_certificates(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn sample(
    name: &str,
    report: &str,
    [vek, ask, ark]: [Vec<u8>; 3],
    policy: &str,
    now: &str,
) -> SnpSample {
    SnpSample {
        name: name.into(),
        bundle: EvidenceBundle { report: read(report), vek, ask: Some(ask), ark, provider: None },
        policy: EvidencePolicy::from_toml(policy).unwrap_or_else(|e| panic!("{name}: {e}")),
        now: parse_time(now).expect("a time"),
    }
}

/// Milan v2 (VCEK), Milan v3 (VLEK, VMPL 1), Genoa v3, Turin v5.
pub fn snp_samples() -> SnpSamples {
    let milan = certs("virtee-sev/cert_chain_milan");
    let vlek = certs("go-sev-guest/milanvlek.testcer");
    let genoa = certs("go-sev-guest/ask_ark_genoa.pem");
    let one = |rel: &str| certs(rel).swap_remove(0);
    SnpSamples::new(vec![
        sample(
            "virtee report_milan",
            "virtee-sev/report_milan.bin",
            [read("virtee-sev/vcek_milan.der"), milan[0].clone(), milan[1].clone()],
            "products = [\"Milan\"]\n",
            "2026-06-01",
        ),
        sample(
            "trustee test-vlek-report",
            "trustee/test-vlek-report.bin",
            [read("trustee/test-vlek.der"), vlek[0].clone(), vlek[1].clone()],
            "products = [\"Milan\"]\nallow_vlek = true\nvmpl = 1\n",
            "2025-06-01",
        ),
        sample(
            "trustee az-genoa",
            "trustee/az-genoa-snp-report.bin",
            [one("trustee/az-genoa-vcek.pem"), genoa[0].clone(), genoa[1].clone()],
            "products = [\"Genoa\"]\n",
            "2026-06-01",
        ),
        sample(
            "microsoft-tav turin",
            "microsoft-tav/turin_attestation_report.bin",
            [
                one("microsoft-tav/turin_vcek.pem"),
                one("microsoft-tav/turin_ask.pem"),
                one("microsoft-tav/turin_ark.pem"),
            ],
            "products = [\"Turin\"]\n",
            "2026-06-01",
        ),
    ])
}
