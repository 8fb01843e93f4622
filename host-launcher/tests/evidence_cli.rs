//! `vouch evidence check|show|simulate` run as the built binary over every real AMD report in
//! `test-support/data/snp` (and simulated evidence from a temporary state directory).

use std::path::Path;
use std::process::Command;

use test_support::snp::testdata;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn vouch(args: &[&str], state: &Path) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_vouch"))
        .args(args)
        .env("VOUCH_STATE_DIR", state)
        .current_dir(testdata())
        .output()
        .expect("run vouch");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Real report, certificate, optional chain, check time and a policy written for it.
struct Case {
    report: &'static str,
    cert: &'static str,
    chain: Option<&'static str>,
    now: &'static str,
    policy: &'static str,
    measurement: &'static str,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            report: "virtee-sev/report_milan.bin",
            cert: "virtee-sev/vcek_milan.der",
            chain: Some("virtee-sev/cert_chain_milan"),
            now: "2026-06-01",
            policy: "products = [\"Milan\"]\n[min_tcb.Milan]\nbootloader = 3\nsnp = 8\nmicrocode = 115\n",
            measurement: "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f",
        },
        Case {
            report: "go-sev-guest/attestation.bin",
            cert: "go-sev-guest/vcek.testcer",
            chain: Some("go-sev-guest/milan.testcer"),
            now: "2026-06-01",
            policy: "[guest_policy]\nallow_debug = true\n",
            measurement: "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01",
        },
        Case {
            report: "trustee/test-report.bin",
            cert: "trustee/test-vcek.der",
            chain: None,
            now: "2026-06-01",
            policy: "products = [\"Milan\"]\n",
            measurement: "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c23500644e0e692e6be917f9050d3d38c",
        },
        Case {
            report: "trustee/test-vlek-report.bin",
            cert: "trustee/test-vlek.der",
            chain: Some("trustee/milan_ask_ark_asvk.pem"),
            now: "2025-06-01",
            policy: "allow_vlek = true\nvmpl = 1\n",
            measurement: "8922ebbdd00ec2c541f36a6e7a82a8773a7accb451ed67bc94e740dbe92c93c4e8c9af857f5ceeb5a493df2a570d7bf0",
        },
        Case {
            report: "trustee/az-milan-snp-report.bin",
            cert: "trustee/az-milan-vcek-ask-ark.pem",
            chain: None,
            now: "2026-06-01",
            policy: "",
            measurement: "9ac48fcac8a2d88aeeff8d427ad4f2be0e3917c748a18bdf52cc317e7fe20308b459d5ef1a12e0c22944eb386d17c315",
        },
        Case {
            report: "trustee/az-genoa-snp-report.bin",
            cert: "trustee/az-genoa-vcek.pem",
            chain: Some("go-sev-guest/ask_ark_genoa.pem"),
            now: "2026-06-01",
            policy: "products = [\"Genoa\"]\n",
            measurement: "f57dc09a507c6ecd82369bffb600f0003792f4d99bc26e985ec0c266fc34faf3706faf814c9e61065768a6ff917c89ae",
        },
        Case {
            report: "microsoft-tav/turin_attestation_report.bin",
            cert: "microsoft-tav/turin_vcek.pem",
            chain: None,
            now: "2026-06-01",
            policy: "products = [\"Turin\"]\n[min_tcb.Turin]\nfmc = 1\nsnp = 4\nmicrocode = 81\n",
            measurement: "6d6c354511d6f7c6d7504668903dc5bdc066a048b651840d8d03fb85299ebfa142fccf1d1b0baca496841bdf243619d4",
        },
    ]
}

fn check_args<'a>(c: &'a Case, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args =
        vec!["evidence", "check", "--report", c.report, "--cert", c.cert, "--now", c.now];
    if let Some(chain) = c.chain {
        args.extend(["--chain", chain]);
    }
    args.extend(extra);
    args
}

#[test]
fn check_passes_on_every_real_report_under_its_policy() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, c) in cases().iter().enumerate() {
        let policy = tmp.path().join(format!("policy-{i}.toml"));
        std::fs::write(&policy, c.policy).unwrap();
        let p = policy.to_str().unwrap();
        let out =
            vouch(&check_args(c, &["--policy", p, "--measurement", c.measurement]), tmp.path());
        assert_eq!(out.code, 0, "{}:\n{}\n{}", c.report, out.stdout, out.stderr);
        assert!(out.stdout.contains("result: PASS: AMD SEV-SNP evidence"), "{}", out.stdout);
        // Nothing to compare HOST_DATA and REPORT_DATA against: marked unchecked, not ok.
        let ok = out.stdout.matches("[ ok ]").count();
        let skipped = out.stdout.matches("[ -- ]").count();
        assert_eq!(ok + skipped, 19, "{}", out.stdout);
        assert!(out.stdout.contains("[ -- ] HOST_DATA"), "{}", out.stdout);
        assert!(out.stdout.contains("[ -- ] REPORT_DATA"), "{}", out.stdout);
        assert!(out.stdout.contains("[ ok ] MEASUREMENT"), "{}", out.stdout);
        let milan = out.stdout.contains("ARK-Milan (pinned), signed by");
        assert_eq!(out.stdout.contains("caveat: Milan caveat"), milan, "{}", out.stdout);
        assert_eq!(
            milan,
            !c.report.contains("genoa") && !c.report.contains("turin"),
            "{}",
            out.stdout
        );
        assert!(out.stdout.contains(&format!("MEASUREMENT: {}", c.measurement)), "{}", out.stdout);
        assert!(out.stdout.contains("REPORT_DATA: "));
        assert!(out.stdout.contains("HOST_DATA:   "));
    }
}

#[test]
fn check_without_policy_checks_authenticity_and_default_bits() {
    let tmp = tempfile::tempdir().unwrap();
    for c in cases() {
        let out = vouch(&check_args(&c, &[]), tmp.path());
        if c.report.contains("attestation.bin") {
            assert_eq!(out.code, 1, "{}", out.stdout);
            assert!(out.stdout.contains("[FAIL] guest policy"), "{}", out.stdout);
            assert!(out.stdout.contains("DEBUG"), "{}", out.stdout);
            assert!(out.stdout.contains("[ ok ] report signature"), "{}", out.stdout);
            assert!(out.stdout.contains("[ -- ] VMPL"), "{}", out.stdout);
        } else if c.report.contains("vlek") {
            assert_eq!(out.code, 1, "{}", out.stdout);
            assert!(out.stdout.contains("[FAIL] signing key kind"), "{}", out.stdout);
        } else {
            assert_eq!(out.code, 0, "{}: {}\n{}", c.report, out.stdout, out.stderr);
            assert!(out.stdout.contains("not checked"), "{}", out.stdout);
        }
        // The three values are printed in every case.
        assert!(out.stdout.contains("MEASUREMENT: "), "{}", out.stdout);
    }
}

#[test]
fn check_demands_exact_values() {
    let tmp = tempfile::tempdir().unwrap();
    let c = &cases()[0];
    let rd = "d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c645810b0f2cdfca0040433be063fc1a8293f0f3f8dae7b79fecb3d1cd82bd6a93ebfd";
    let hd = "0000000000000000000000000000000000000000000000000000000000000000";
    let out = vouch(&check_args(c, &["--report-data", rd, "--host-data", hd]), tmp.path());
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(out.stdout.contains("(as expected)"));
    let wrong_rd = format!("{}00", &rd[..126]);
    let out = vouch(&check_args(c, &["--report-data", &wrong_rd]), tmp.path());
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("[FAIL] REPORT_DATA"), "{}", out.stdout);
    let out = vouch(&check_args(c, &["--host-data", &"11".repeat(32)]), tmp.path());
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("[FAIL] HOST_DATA"), "{}", out.stdout);
    let out = vouch(&check_args(c, &["--measurement", &"00".repeat(48)]), tmp.path());
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("[FAIL] MEASUREMENT"), "{}", out.stdout);
}

#[test]
fn check_fails_on_expiry_wrong_product_and_foreign_certs() {
    let tmp = tempfile::tempdir().unwrap();
    let vlek = &cases()[3];
    let policy = tmp.path().join("vlek.toml");
    std::fs::write(&policy, vlek.policy).unwrap();
    // The VLEK at a time after its validity.
    let mut args = check_args(vlek, &["--policy", policy.to_str().unwrap()]);
    let now = args.iter().position(|a| *a == "--now").unwrap();
    args[now + 1] = "2026-01-01";
    let out = vouch(&args, tmp.path());
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("[FAIL] certificate validity"), "{}", out.stdout);
    // The Turin VCEK under the Milan chain.
    let turin = &cases()[6];
    let out = vouch(&check_args(turin, &["--chain", "virtee-sev/cert_chain_milan"]), tmp.path());
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("[FAIL] ASK signs VCEK/VLEK"), "{}", out.stdout);
    // A Turin report checked against a (valid) Milan VCEK and chain.
    let mut c = cases().remove(0);
    c.report = "microsoft-tav/turin_attestation_report.bin";
    let out = vouch(&check_args(&c, &[]), tmp.path());
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("[FAIL] product"), "{}", out.stdout);
}

#[test]
fn bad_input_is_an_error_not_a_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let c = &cases()[0];
    let out =
        vouch(&["evidence", "check", "--report", "missing.bin", "--cert", c.cert], tmp.path());
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("missing.bin"), "{}", out.stderr);
    let out = vouch(&check_args(c, &["--report-data", "xyz"]), tmp.path());
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("--report-data"), "{}", out.stderr);
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "allow_vlek = \"maybe\"\n").unwrap();
    let out = vouch(&check_args(c, &["--policy", bad.to_str().unwrap()]), tmp.path());
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("invalid evidence policy"), "{}", out.stderr);
    let out = vouch(&["evidence", "show", "README.md"], tmp.path());
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("1184"), "{}", out.stderr);
}

#[test]
fn show_prints_every_real_report() {
    let tmp = tempfile::tempdir().unwrap();
    for c in cases() {
        let out = vouch(&["evidence", "show", c.report], tmp.path());
        assert_eq!(out.code, 0, "{}", out.stderr);
        for field in ["VERSION", "POLICY", "REPORTED_TCB", "CHIP_ID", "REPORT_DATA", "HOST_DATA"] {
            assert!(out.stdout.contains(field), "{}: {field}\n{}", c.report, out.stdout);
        }
        assert!(out.stdout.contains(c.measurement), "{}", out.stdout);
    }
    let turin =
        vouch(&["evidence", "show", "microsoft-tav/turin_attestation_report.bin"], tmp.path());
    assert!(
        turin.stdout.contains("fmc=1 bootloader=1 tee=1 snp=4 microcode=81"),
        "{}",
        turin.stdout
    );
    let debug = vouch(&["evidence", "show", "go-sev-guest/attestation.bin"], tmp.path());
    assert!(debug.stdout.contains("DEBUG allowed"), "{}", debug.stdout);
}

#[test]
fn simulated_evidence_says_simulated_and_needs_its_root_in_the_policy() {
    let state = tempfile::tempdir().unwrap();
    let out_dir = state.path().join("out");
    let o = out_dir.to_str().unwrap();
    let m = "ab".repeat(48);
    let out = vouch(
        &[
            "evidence",
            "simulate",
            "--out",
            o,
            "--measurement",
            &m,
            "--report-data",
            &"cd".repeat(64),
        ],
        state.path(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("SIMULATED"), "{}", out.stdout);
    assert!(state.path().join("simulated-snp/vcek.key").exists());
    let report = out_dir.join("report.bin");
    let args = |policy: Option<&str>| {
        let mut a = vec![
            "evidence".to_string(),
            "check".into(),
            "--report".into(),
            report.to_str().unwrap().into(),
            "--cert".into(),
            out_dir.join("vcek.der").to_str().unwrap().into(),
            "--chain".into(),
            out_dir.join("ark.der").to_str().unwrap().into(),
        ];
        if let Some(p) = policy {
            a.extend(["--policy".into(), p.into()]);
        }
        a
    };
    let policy = out_dir.join("policy.toml");
    let with: Vec<String> = args(Some(policy.to_str().unwrap()));
    let out = vouch(&with.iter().map(String::as_str).collect::<Vec<_>>(), state.path());
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("result: PASS: SIMULATED evidence"), "{}", out.stdout);
    assert!(out.stdout.contains("SIMULATED root"), "{}", out.stdout);
    let without: Vec<String> = args(None);
    let out = vouch(&without.iter().map(String::as_str).collect::<Vec<_>>(), state.path());
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("[FAIL] root of trust"), "{}", out.stdout);
    let show = vouch(&["evidence", "show", report.to_str().unwrap()], state.path());
    assert!(show.stdout.contains("SIMULATED"), "{}", show.stdout);
}

/// A trace entry directory holding `evidence.json` (and `statement.json` when given), as the
/// trace store writes it.
fn entry(dir: &Path, bundle: &build_trace::evidence::EvidenceBundle, statement: Option<&[u8]>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("evidence.json"), serde_json::to_vec(bundle).unwrap()).unwrap();
    if let Some(st) = statement {
        std::fs::write(dir.join("statement.json"), st).unwrap();
    }
}

/// A golden statement of `build-trace/tests/data/golden/` (`statement-v1.json`, `-v2.json`).
fn golden_statement(version: u8) -> Vec<u8> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../build-trace/tests/data/golden");
    std::fs::read(format!("{dir}/statement-v{version}.json")).unwrap()
}

#[test]
fn check_reads_the_bundle_vouch_stores_and_marks_what_it_did_not_check() {
    use build_trace::evidence::EvidenceBundle;
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("milan.toml");
    std::fs::write(&policy, "products = [\"Milan\"]\n").unwrap();
    let p = policy.to_str().unwrap();
    // A real Milan report with AMD's built-in chain, stored as vouch stores it.
    let read = |rel: &str| std::fs::read(testdata().join(rel)).unwrap();
    let bundle = EvidenceBundle::with_builtin_chain(
        read("trustee/test-report.bin"),
        read("trustee/test-vcek.der"),
    )
    .unwrap();
    let dir = tmp.path().join("entry");
    entry(&dir, &bundle, None);
    let d = dir.to_str().unwrap();
    let file = dir.join("evidence.json");
    for target in [d, file.to_str().unwrap()] {
        let args = ["evidence", "check", "--bundle", target, "--now", "2026-06-01", "--policy", p];
        let out = vouch(&args, tmp.path());
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("result: PASS: AMD SEV-SNP evidence"), "{}", out.stdout);
        assert!(out.stdout.contains("[ -- ] REPORT_DATA"), "{}", out.stdout);
        assert!(out.stdout.contains("[ -- ] minimum TCB"), "{}", out.stdout);
        assert!(out.stdout.contains("caveat: Milan caveat (docs/evidence.md)"), "{}", out.stdout);
        assert!(out.stdout.contains("arXiv 2605.12990"), "{}", out.stdout);
    }
    let json =
        vouch(&["evidence", "check", "--bundle", d, "--now", "2026-06-01", "--json"], tmp.path());
    assert_eq!(json.code, 0, "{}", json.stderr);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["result"], "pass");
    assert_eq!(v["simulated"], false);
    let status = |name: &str| {
        v["checks"].as_array().unwrap().iter().find(|c| c["check"] == name).unwrap()["status"]
            .clone()
    };
    assert_eq!(status("report signature"), "ok");
    assert_eq!(status("REPORT_DATA"), "not-checked");
    assert_eq!(v["checks"].as_array().unwrap().len(), 19);
    assert!(v["caveats"][0].as_str().unwrap().contains("Milan"), "{v}");

    // Beside a statement it does not attest: HOST_DATA and REPORT_DATA are now demanded.
    entry(&dir, &bundle, Some(&golden_statement(2)));
    let out = vouch(&["evidence", "check", "--bundle", d, "--now", "2026-06-01"], tmp.path());
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("expected from"), "{}", out.stdout);
    assert!(out.stdout.contains("[FAIL] HOST_DATA"), "{}", out.stdout);
    assert!(out.stdout.contains("[ -- ] REPORT_DATA              not reached"), "{}", out.stdout);
    assert!(!out.stdout.contains("caveat"), "{}", out.stdout);

    // Not a bundle, and both forms at once: bad input (2).
    std::fs::write(dir.join("evidence.json"), "{}").unwrap();
    let out = vouch(&["evidence", "check", "--bundle", d], tmp.path());
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("not an evidence bundle"), "{}", out.stderr);
    let out =
        vouch(&["evidence", "check", "--bundle", d, "--report", "x", "--cert", "y"], tmp.path());
    assert_eq!(out.code, 2, "{}", out.stderr);
}

#[test]
fn a_stored_bundle_is_checked_against_its_statement() {
    for version in [1, 2] {
        stored_bundle_against(&golden_statement(version));
    }
}

/// A simulated report of `st`'s HOST_DATA and REPORT_DATA passes beside it, and only with them.
fn stored_bundle_against(st: &[u8]) {
    use build_trace::evidence::EvidenceBundle;
    use build_trace::statement::{host_data_of, report_data_of};
    let state = tempfile::tempdir().unwrap();
    let out_dir = state.path().join("sim");
    let o = out_dir.to_str().unwrap();
    let rd = hex::encode(report_data_of(st));
    let hd = hex::encode(host_data_of(st).unwrap());
    let made = vouch(
        &["evidence", "simulate", "--out", o, "--report-data", &rd, "--host-data", &hd],
        state.path(),
    );
    assert_eq!(made.code, 0, "{}", made.stderr);
    let read = |n: &str| std::fs::read(out_dir.join(n)).unwrap();
    let bundle = EvidenceBundle {
        report: read("report.bin"),
        vek: read("vcek.der"),
        ask: None,
        ark: read("ark.der"),
        provider: Some("simulated".into()),
    };
    let dir = state.path().join("entry");
    entry(&dir, &bundle, Some(st));
    let d = dir.to_str().unwrap();
    let policy = out_dir.join("policy.toml");
    let args = ["evidence", "check", "--bundle", d, "--policy", policy.to_str().unwrap()];
    let out = vouch(&args, state.path());
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(&format!("[ ok ] HOST_DATA                {hd} (as expected)")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("[ ok ] REPORT_DATA              {rd} (as expected)")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("result: PASS: SIMULATED evidence"), "{}", out.stdout);
    assert!(!out.stdout.contains("caveat"), "{}", out.stdout);
    // A REPORT_DATA given on the command line wins over the statement's.
    let mut wrong = args.to_vec();
    let other = "00".repeat(64);
    wrong.extend(["--report-data", &other]);
    let out = vouch(&wrong, state.path());
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("[FAIL] REPORT_DATA"), "{}", out.stdout);
}
