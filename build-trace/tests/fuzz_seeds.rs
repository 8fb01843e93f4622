//! Replays the seed corpora of build-trace's fuzz targets (`fuzz/seeds/<target>/`) through their
//! bodies (`build_trace::fuzzing`) under their heap bound, with single-byte mutations, on every
//! stable `cargo test`; the regression tests of what the fuzzers found; and the generators of
//! the corpora that are not copied from elsewhere (`--ignored`).

use test_support::fuzz::{alloc, replay};

use std::path::PathBuf;
use std::sync::OnceLock;

use build_trace::evidence::cert_table::{self, CertEntry, CertKind, ENTRY_LEN};
use build_trace::fuzzing::evidence::{snp_report, vek_cert, SnpSamples};
use build_trace::fuzzing::tlog::{LOG_ORIGIN, LOG_VKEY, WITNESS_VKEYS};
use build_trace::fuzzing::{self, BOUND};
use build_trace::tlog::note::{add_signatures, checkpoint_text};
use build_trace::tlog::{CosignerKey, LogKey};

#[global_allocator]
static HEAP: alloc::Counting = alloc::Counting;

fn samples() -> &'static SnpSamples {
    static S: OnceLock<SnpSamples> = OnceLock::new();
    S.get_or_init(|| build_trace::fuzzing::samples::real_samples(&test_support::snp::read))
}

fn snp_report_body(data: &[u8]) {
    snp_report(data, samples());
}

fn vek_cert_body(data: &[u8]) {
    vek_cert(data, samples());
}

#[test]
fn canonical_seeds() {
    replay::replay("canonical", 5, |n| BOUND.limit(n), fuzzing::canonical);
}

#[test]
fn job_seeds() {
    for (p, bytes) in replay::seeds("job") {
        build_trace::Job::from_canonical_bytes(&bytes)
            .unwrap_or_else(|e| panic!("seed {} must be accepted: {e}", p.display()));
    }
    replay::replay("job", 3, |n| BOUND.limit(n), fuzzing::job);
}

#[test]
fn statement_seeds() {
    for (p, bytes) in replay::seeds("statement") {
        build_trace::Statement::from_canonical_bytes(&bytes)
            .unwrap_or_else(|e| panic!("seed {} must be accepted: {e}", p.display()));
    }
    replay::replay("statement", 3, |n| BOUND.limit(n), fuzzing::statement);
}

#[test]
fn cert_table_seeds() {
    replay::replay("cert_table", 5, |n| BOUND.limit(n), fuzzing::cert_table);
}

#[test]
fn snp_report_seeds() {
    let _ = samples();
    replay::replay("snp_report", 53, |n| BOUND.limit(n), snp_report_body);
}

#[test]
fn vek_cert_seeds() {
    let _ = samples();
    replay::replay("vek_cert", 11, |n| BOUND.limit(n), vek_cert_body);
}

/// Found by `vek_cert` (`fuzz/seeds/vek_cert/regress-der-length-alloc`): `der` 0.7 allocated
/// an owned value's declared length before reading it, 8 MiB for a 1.4 KiB certificate. A
/// certificate whose inner length claims 128 MiB is refused, as DER or PEM, without a large heap.
#[test]
fn a_der_length_past_its_parent_allocates_nothing() {
    use build_trace::evidence::certs;
    let real = certs::load_certificates(&test_support::snp::read("virtee-sev/vcek_milan.der"))
        .expect("the real VCEK loads")
        .remove(0);
    // The first primitive inside the tbsCertificate (its version INTEGER's bytes are replaced
    // by a BIT STRING claiming 128 MiB where the certificate has a few hundred).
    let mut der = real.clone();
    let at = 8; // SEQUENCE(4) SEQUENCE(4): the tbsCertificate's first member
    der.splice(at.., [&[0x03, 0x84, 0x08, 0x00, 0x00, 0x00][..], &real[at..]].concat());
    let pem =
        format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", base64_lines(&der));
    for input in [der.clone(), pem.into_bytes()] {
        let (r, heap) = alloc::measure(|| certs::load_certificates(&input));
        let e = r.expect_err("a length past its parent");
        let msg = e.to_string().to_lowercase();
        assert!(msg.contains("incomplete") || msg.contains("length"), "{e}");
        assert!(heap < 64 << 10, "{heap} bytes of heap for a {}-byte input", input.len());
    }
    assert!(certs::check_der_lengths(&real).is_ok());
}

fn base64_lines(der: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    text.as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn tlog_seeds() {
    replay::replay("tlog", 3, |n| BOUND.limit(n), fuzzing::tlog::tlog);
}

#[test]
fn trust_policy_seeds() {
    replay::replay(
        "trust_policy",
        3,
        |n| fuzzing::TOML_BOUND.limit(n),
        fuzzing::tlog::trust_policy,
    );
}

fn seed_dir(target: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds").join(target);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(seed_dir(target).join(name), bytes).unwrap();
}

/// The fuzz log's keys are the ones `build_trace::fuzzing::tlog` trusts.
#[test]
fn fuzz_log_keys_match() {
    assert_eq!(LogKey::from_seed(LOG_ORIGIN, [1; 32]).unwrap().vkey(), LOG_VKEY);
    for (i, vkey) in WITNESS_VKEYS.iter().enumerate() {
        let w = CosignerKey::from_seed(&format!("w{}.fuzz", i + 1), [i as u8 + 2; 32]).unwrap();
        assert_eq!(&w.vkey(), vkey);
    }
}

/// Writes the generated seeds: the real SNP reports and VEKs with their sample selector byte, a
/// certificate table of a real chain, checkpoints of the fuzz log, the jobs of the statement
/// seeds (run with `--ignored`).
#[test]
#[ignore = "regenerates fuzz/seeds/{snp_report,vek_cert,cert_table,tlog,job}"]
fn write_generated_seeds() {
    let names = ["milan", "vlek", "genoa", "turin"];
    let read = test_support::snp::read;
    let reports = [
        "virtee-sev/report_milan.bin",
        "trustee/test-vlek-report.bin",
        "trustee/az-genoa-snp-report.bin",
        "microsoft-tav/turin_attestation_report.bin",
    ];
    for (i, (name, rel)) in names.iter().zip(reports).enumerate() {
        write("snp_report", &format!("{name}.bin"), &[&[i as u8][..], &read(rel)].concat());
    }
    let veks = [
        read("virtee-sev/vcek_milan.der"),
        read("trustee/test-vlek.der"),
        read("trustee/az-genoa-vcek.pem"),
        read("microsoft-tav/turin_vcek.pem"),
    ];
    for (i, (name, vek)) in names.iter().zip(&veks).enumerate() {
        write("vek_cert", name, &[&[i as u8][..], vek].concat());
    }
    let chain =
        build_trace::evidence::certs::load_certificates(&read("trustee/az-milan-vcek-ask-ark.pem"))
            .unwrap();
    let table = cert_table::encode(&[
        CertEntry { kind: CertKind::Vcek, data: chain[0].clone() },
        CertEntry { kind: CertKind::Ask, data: chain[1].clone() },
        CertEntry { kind: CertKind::Ark, data: chain[2].clone() },
    ]);
    write("cert_table", "az-milan-vcek-ask-ark", &table);
    write("cert_table", "empty", &[0u8; ENTRY_LEN]);

    let log = LogKey::from_seed(LOG_ORIGIN, [1; 32]).unwrap();
    let note = log.sign_checkpoint(3, &build_trace::tlog::Hash([7; 32])).unwrap();
    write("tlog", "checkpoint", &note);
    let text = checkpoint_text(LOG_ORIGIN, 3, &build_trace::tlog::Hash([7; 32]));
    let w1 = CosignerKey::from_seed("w1.fuzz", [2; 32]).unwrap();
    let w2 = CosignerKey::from_seed("w2.fuzz", [3; 32]).unwrap();
    let mut cosigned = add_signatures(&note, &w1.cosign(text.as_bytes(), 1_700_000_000)).unwrap();
    cosigned = add_signatures(&cosigned, &w2.cosign(text.as_bytes(), 1_700_000_001)).unwrap();
    write("tlog", "checkpoint-cosigned", &cosigned);

    // The jobs inside the statement seeds, as the canonical decoder finds them.
    for (p, st) in replay::seeds("statement") {
        let job = build_trace::canonical::member(&st, "job").expect("a statement has a job");
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        write("job", &format!("of-{name}"), job);
    }
}

#[test]
fn trace_source_seeds() {
    let n = replay::replay("trace_source", 7, |n| BOUND.limit(n), fuzzing::source::trace_source);
    assert!(n >= 10, "{n} seeds");
}
