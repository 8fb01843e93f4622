//! `vouch verify --plan-rebuild` and `vouch rebuild` without VMs, on the real-Nix closure
//! fixture ([`tests::fixture`]): nothing to rebuild under the fixture's own policy; under a
//! policy whose key signed nothing, every traced step is rebuilt (the first ready now, the
//! others after it, none conditional: their traces would not satisfy the policy either) and the
//! fixed-output one is kept; a refused md5 fixed output blocks the plan (exit 1, and
//! `vouch rebuild` stops before any VM); usage errors exit 2.

use std::process::{Command, Output};

use build_trace::trust::TrustModel;
use nix_formats::signing::SecretKey;
use test_support::nix::text;
use test_support::vm::vouch_bin;
use tests::fixture::Fixture;

fn vouch(args: &[&str]) -> Output {
    Command::new(vouch_bin()).args(args).output().unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

#[test]
fn plans_and_their_exit_codes() {
    let fx = Fixture::new(&["c"]);
    let dir = tempfile::tempdir().unwrap();
    let own = fx.write_sim_policy(dir.path());
    // A policy whose only key signed nothing here.
    let other = SecretKey::from_seed("other-1", [3; 32]);
    let mut p = fx.policy(TrustModel::Leaf("key:other-1".into()));
    p.keys = [(other.name().to_string(), other.public_key().to_string())].into();
    p.builders.clear();
    let strict = dir.path().join("strict.toml");
    std::fs::write(&strict, p.to_toml()).unwrap();
    let (traces, drv_dir) = (fx.traces.display().to_string(), fx.store_dir.display().to_string());
    let plan = |policy: &std::path::Path, extra: &[&str], attr: &str| {
        let p = policy.to_str().unwrap();
        let drv = fx.drvs[attr].to_string();
        let head = ["verify", "--plan-rebuild", "--policy", p, "--traces", &traces];
        vouch(&[&head[..], &["--drv-dir", &drv_dir], extra, &[&drv]].concat())
    };

    let ok = plan(&own, &[], "c");
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(text(&ok).contains("NOTHING TO REBUILD"), "{}", text(&ok));
    let v = json(&plan(&own, &["--json"], "c"));
    assert_eq!(
        (v["result"].as_str(), v["rebuild"].as_array().map(Vec::len)),
        (Some("verified"), Some(0))
    );

    // fod (fixed), a, b, c: the three CA steps are rebuilt, a first.
    let r = plan(&strict, &[], "c");
    assert_eq!(r.status.code(), Some(0), "{}", text(&r));
    assert!(text(&r).contains("REBUILD 3 of 4 steps"), "{}", text(&r));
    let v = json(&plan(&strict, &["--json"], "c"));
    assert_eq!(v["result"], "rebuild");
    let ids = |attrs: &[&str]| -> serde_json::Value {
        attrs.iter().map(|a| fx.drvs[*a].to_string()).collect::<Vec<_>>().into()
    };
    assert_eq!(v["rebuild"], ids(&["a", "b", "c"]), "{v:#}");
    assert_eq!(v["conditional"], ids(&[]));
    let steps = v["steps"].as_array().unwrap();
    let action = |attr: &str| {
        let s = steps.iter().find(|s| s["drv"] == fx.drvs[attr].to_string()).unwrap();
        (s["action"].as_str().unwrap().to_owned(), s["reason"]["check"].clone())
    };
    assert_eq!(action("fod").0, "fixed");
    assert_eq!(action("a"), ("rebuild".into(), "no-trusted-signer".into()));
    // b's earlier trace, against a's predicted output, still has no trusted signer.
    assert_eq!(action("b"), ("rebuild".into(), "no-trusted-signer".into()));
    let b = steps.iter().find(|s| s["drv"] == fx.drvs["b"].to_string()).unwrap();
    assert_eq!(b["waits_for"], ids(&["a"]));
    assert_eq!(b["outputs"]["out"], fx.outs["b"].to_string(), "predicted from its trace");

    // md5 fixed output under a policy that refuses it: no rebuild helps.
    let blocked = plan(&own, &[], "weak");
    assert_eq!(blocked.status.code(), Some(1), "{}", text(&blocked));
    assert!(
        text(&blocked).contains("BLOCKED") && text(&blocked).contains("md5"),
        "{}",
        text(&blocked)
    );
    let state = dir.path().join("state");
    let st = state.to_str().unwrap();
    let weak = fx.drvs["weak"].to_string();
    let o = own.to_str().unwrap();
    let rb = ["--state-dir", st, "rebuild", "--policy", o, "--read-traces", &traces];
    let r =
        vouch(&[&rb[..], &["--drv-dir", &drv_dir, "--key-name", "t-simulated-1", &weak]].concat());
    assert_eq!(r.status.code(), Some(1), "{}", text(&r));
    assert!(text(&r).contains("BLOCKED") && !text(&r).contains("fresh VM"), "{}", text(&r));

    // Usage: --plan-rebuild with --expect; a missing policy.
    let c_out = fx.outs["c"].to_string();
    let u = plan(&own, &["--expect", &c_out], "c");
    assert_eq!(u.status.code(), Some(2), "{}", text(&u));
    let u = vouch(&["rebuild", "--traces", &traces, &weak]);
    assert_eq!(u.status.code(), Some(2), "{}", text(&u));
}
