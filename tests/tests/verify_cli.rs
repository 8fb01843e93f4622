//! `vouch verify`, `vouch trace show`, `vouch trace reindex` and `vouch provenance` (the built
//! binary) on a closure built by the real Debian Nix with simulated-evidence traces
//! ([`tests::fixture`]): exit codes 0/1/2, `--json`, the default policy rejecting simulated
//! evidence.

use std::process::{Command, Output};

use test_support::nix::text;
use test_support::vm::vouch_bin;
use tests::fixture::Fixture;

fn vouch(args: &[&str]) -> Output {
    Command::new(vouch_bin()).args(args).output().unwrap()
}

#[test]
fn verify_trace_and_provenance_commands() {
    let fx = Fixture::new(&["c"]);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        fx.policy(build_trace::trust::TrustModel::Leaf("builder:sim".into())).to_toml(),
    )
    .unwrap();
    let traces = fx.traces.display().to_string();
    let drv_dir = fx.store_dir.display().to_string();
    let drv = fx.drvs["c"].to_string();
    let out = &fx.outs["c"].to_string();
    let p = policy.display().to_string();
    // `vouch verify` under the fixture's policy, with its traces and `.drv` files.
    let verify = |args: &[&str]| {
        let mut all = vec!["verify", "--policy", &p, "--traces", &traces, "--drv-dir", &drv_dir];
        all.extend(args);
        vouch(&all)
    };

    let ok = verify(&["--expect", out, &drv]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(text(&ok).contains("VERIFIED") && text(&ok).contains("SIMULATED"), "{}", text(&ok));

    let json = verify(&["--json", &drv]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["result"], "verified");
    assert_eq!(v["outputs"]["out"], out.as_str());

    let default = vouch(&["verify", "--traces", &traces, "--drv-dir", &drv_dir, &drv]);
    assert_eq!(default.status.code(), Some(1), "{}", text(&default));
    assert!(
        text(&default).contains("NOT VERIFIED") && text(&default).contains("simulated root"),
        "{}",
        text(&default)
    );

    let a_out = fx.outs["a"].to_string();
    let wrong = verify(&["--expect", &a_out, &drv]);
    assert_eq!(wrong.status.code(), Some(1), "{}", text(&wrong));

    // `--jobs`: the same verdicts, word for word, on one thread and on several.
    for args in [&["--json", &drv][..], &["--expect", &a_out, &drv][..]] {
        let one = verify(&[&["--jobs", "1"][..], args].concat());
        let four = verify(&[&["-j", "4"][..], args].concat());
        assert_eq!((one.status.code(), &one.stdout), (four.status.code(), &four.stdout));
    }
    let zero = verify(&["--jobs", "0", &drv]);
    assert_eq!(zero.status.code(), Some(2), "{}", text(&zero));

    let bad = vouch(&["verify", "--traces", &traces, "not-a-drv"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("not a derivation store path"), "{}", text(&bad));

    let show = vouch(&["trace", "show", "--traces", &traces, out]);
    assert_eq!(show.status.code(), Some(0), "{}", text(&show));
    assert!(
        text(&show).contains("SIMULATED") && text(&show).contains(out.as_str()),
        "{}",
        text(&show)
    );

    let prov = vouch(&["provenance", "--traces", &traces, out]);
    assert_eq!(prov.status.code(), Some(0), "{}", text(&prov));
    let st: serde_json::Value = serde_json::from_slice(&prov.stdout).unwrap();
    assert_eq!(st["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(st["predicateType"], "https://slsa.dev/provenance/v1");
    assert_eq!(st["subject"][0]["name"], out.as_str());
    assert!(st["predicate"]["runDetails"]["builder"]["id"]
        .as_str()
        .unwrap()
        .contains("/simulated#measurement="));

    // laut's index: `trace reindex` rebuilds exactly what writing the steps wrote.
    let index = fx.traces.join("traces");
    let written: Vec<_> = std::fs::read_dir(&index).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(!written.is_empty());
    let before: Vec<Vec<u8>> = written.iter().map(|p| std::fs::read(p).unwrap()).collect();
    std::fs::remove_dir_all(&index).unwrap();
    let re = vouch(&["trace", "reindex", "--traces", &traces]);
    assert_eq!(re.status.code(), Some(0), "{}", text(&re));
    assert!(text(&re).contains(&format!("{} steps", written.len())), "{}", text(&re));
    let after: Vec<Vec<u8>> = written.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(after, before);
}
