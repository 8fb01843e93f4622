//! Evidence verification throughput against OpenSSL's P-384 verify, measured in the same run.
//!
//! `cargo bench -p build-trace --bench evidence` alternates, for three rounds, the baseline
//! `openssl speed -seconds 3 ecdsap384` (OpenSSL's ECDSA P-384 verifications per second of
//! user CPU time on this machine) with ~3 s of each of our measurements: full verification of
//! real AMD evidence (report + chain, the chain cached per VCEK as in steady state), the bare
//! report signature with aws-lc-rs (what the verifier uses) and with the `p384` crate, the
//! RSA-4096 PSS chain (ARK self-signature, ARK → ASK, ASK → VCEK) with aws-lc-rs and with the
//! `rsa` crate (through the `sev` crate's chain check), and cold verification (fresh cache:
//! chain checks included). Our rates are per second of this thread's CPU time, like
//! OpenSSL's; the wall clock rate is printed too. The summary is the median ratio to OpenSSL
//! over the rounds.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it runs each measurement once as a
//! smoke test and skips OpenSSL.

#[path = "../tests/evidence_support/mod.rs"]
mod evidence_support;
mod support;

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use build_trace::evidence::certs;
use build_trace::evidence::report::{offset, SIGNED_LEN};
use build_trace::evidence::{Expected, Verifier};
use evidence_support::{real_cases, RealCase};
use p384::ecdsa::signature::hazmat::PrehashVerifier;
use sev::certs::snp::Verifiable;
use sha2::{Digest, Sha384};
use x509_cert::Certificate;

/// Runs `f` repeatedly for about `secs` seconds of wall time; returns operations per second of
/// this thread's CPU time — the divisor `openssl speed` uses by default (user CPU time), so a
/// busy machine skews neither side — and per second of wall time.
fn rate(secs: f64, f: &mut dyn FnMut()) -> (f64, f64) {
    let budget = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let cpu_start = support::cpu();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..16 {
            f();
        }
        n += 16;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = match support::cpu().checked_sub(cpu_start) {
        Some(d) if !d.is_zero() => d.as_secs_f64(),
        _ => wall,
    };
    (n as f64 / cpu, n as f64 / wall)
}

/// OpenSSL's ECDSA P-384 verifications per second (`openssl speed`, "verify/s" column).
fn openssl_p384_verify_rate() -> Result<f64, String> {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "3", "ecdsap384"])
        .output()
        .map_err(|e| format!("cannot run openssl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("ecdsa (nistp384)"))
        .ok_or_else(|| format!("no nistp384 line in openssl output:\n{text}"))?;
    line.split_whitespace()
        .last()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("cannot parse {line:?}"))
}

fn signature(case: &RealCase) -> ([u8; 48], [u8; 48], [u8; 48]) {
    let r = &case.bundle.report;
    let mut rb = [0u8; 48];
    let mut sb = [0u8; 48];
    for i in 0..48 {
        rb[i] = r[offset::SIGNATURE_R + 47 - i];
        sb[i] = r[offset::SIGNATURE_S + 47 - i];
    }
    (Sha384::digest(&r[..SIGNED_LEN]).into(), rb, sb)
}

/// One measurement: a name and a closure run repeatedly.
type Measure<'a> = (String, Box<dyn FnMut() + 'a>);

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let cases = real_cases();
    let mut measures = measures(&cases);
    if !full {
        for (name, f) in measures.iter_mut() {
            f();
            println!("{name:<56} ok (smoke run; `cargo bench` measures)");
        }
        return;
    }
    compare_with_openssl(&mut measures);
}

/// Our measurements on the real `cases` (Milan's and Turin's evidence), each checked once
/// before it is measured.
fn measures(cases: &[RealCase]) -> Vec<Measure<'_>> {
    let turin = cases.iter().find(|c| c.name.contains("Turin")).expect("Turin case");
    let milan = cases.iter().find(|c| c.name.starts_with("virtee")).expect("Milan case");
    let expected =
        |c: &RealCase| Expected { host_data: Some(c.host_data), report_data: Some(c.report_data) };

    let mut measures: Vec<Measure<'_>> = Vec::new();
    for case in [milan, turin] {
        let verifier = Verifier::new();
        let want = expected(case);
        verifier
            .verify_at(&case.bundle, &case.policy, &want, case.now)
            .expect("real evidence verifies");
        measures.push((
            format!("full evidence check, chain cached ({})", case.product),
            Box::new(move || {
                black_box(verifier.verify_at(&case.bundle, &case.policy, &want, case.now).unwrap());
            }),
        ));
    }
    let vek: Certificate = x509_cert::der::Decode::from_der(&turin.bundle.vek).unwrap();
    let sec1 = certs::spki_bits(&vek);
    let (digest, r_be, s_be) = signature(turin);
    let mut rs = [0u8; 96];
    rs[..48].copy_from_slice(&r_be);
    rs[48..].copy_from_slice(&s_be);
    let signed = &turin.bundle.report[..SIGNED_LEN];
    let key = certs::vek_public_key(&vek).unwrap();
    key.verify_sig(signed, &rs).unwrap();
    measures.push((
        "report signature only, aws-lc-rs (SHA-384 included)".into(),
        Box::new(move || assert!(black_box(key.verify_sig(signed, &rs)).is_ok())),
    ));
    let vk = p384::ecdsa::VerifyingKey::from_sec1_bytes(sec1).unwrap();
    let sig = p384::ecdsa::Signature::from_slice(&rs).unwrap();
    measures.push((
        "report signature only, p384 crate verify_prehash".into(),
        Box::new(move || assert!(black_box(vk.verify_prehash(&digest, &sig).is_ok()))),
    ));
    let der = |b: &[u8]| -> Certificate { x509_cert::der::Decode::from_der(b).unwrap() };
    let chain = [der(&turin.bundle.ark), der(turin.bundle.ask.as_ref().unwrap()), vek.clone()];
    let links = [(0, 0), (0, 1), (1, 2)];
    measures.push((
        "RSA-4096 PSS chain (3 signatures), aws-lc-rs".into(),
        Box::new({
            let chain = chain.clone();
            move || {
                for (i, j) in links {
                    certs::verify_rsa_pss(&chain[i], &chain[j]).unwrap();
                }
            }
        }),
    ));
    let sev_chain = chain.map(sev::certs::snp::Certificate::from);
    measures.push((
        "RSA-4096 PSS chain (3 signatures), rsa crate (via sev)".into(),
        Box::new(move || {
            for (i, j) in links {
                (&sev_chain[i], &sev_chain[j]).verify().unwrap();
            }
        }),
    ));
    let want = expected(turin);
    measures.push((
        "cold: fresh cache (RSA-4096 chain, key parsing, report)".into(),
        Box::new(move || {
            let v = Verifier::new();
            black_box(v.verify_at(&turin.bundle, &turin.policy, &want, turin.now).unwrap());
        }),
    ));

    measures
}

/// The OpenSSL baseline and `measures`, alternately for a few rounds; the summary is the
/// median ratio over the rounds.
fn compare_with_openssl(measures: &mut [Measure<'_>]) {
    // Rounds alternate the OpenSSL baseline and our measurements, so that a change in machine
    // load affects both; the summary is the median ratio over the rounds.
    const ROUNDS: usize = 3;
    let mut ratios = vec![Vec::new(); measures.len()];
    for round in 1..=ROUNDS {
        let base = openssl_p384_verify_rate().unwrap_or_else(|e| panic!("baseline required: {e}"));
        println!(
            "round {round}: {:<56} {base:>8.0}/s  1.00x",
            "OpenSSL ECDSA P-384 verify (openssl speed)"
        );
        for (i, (name, f)) in measures.iter_mut().enumerate() {
            let (r, wall) = rate(3.0, f);
            ratios[i].push(r / base);
            println!(
                "round {round}: {name:<56} {r:>8.0}/s  {:>4.2}x  (wall clock {wall:.0}/s)",
                r / base
            );
        }
    }
    println!("\nmedian ratio to OpenSSL's P-384 verify over {ROUNDS} rounds:");
    for ((name, _), mut rs) in measures.iter().zip(ratios) {
        rs.sort_by(f64::total_cmp);
        println!("  {name:<56} {:>4.2}x", rs[ROUNDS / 2]);
    }
}
