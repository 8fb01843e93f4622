//! `vouch provenance` by the spec (issue 14, item 5), on the real-Nix fixture: an in-toto
//! Statement v1 / SLSA Provenance v1 that in-toto's own Python bindings (PyPI
//! `in-toto-attestation`) accept, byproduct `content` in base64, the stable `buildType`, a
//! `builder.id` naming the policy rule that accepted the step; `--sign` makes DSSE envelopes
//! with the launcher key that `vouch provenance verify` checks, and a changed byte fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use test_support::nix::text;
use test_support::vm::vouch_bin;
use tests::fixture::Fixture;

fn vouch(state: &Path, args: &[&str]) -> Output {
    Command::new(vouch_bin()).arg("--state-dir").arg(state).args(args).output().unwrap()
}

#[test]
fn provenance_is_signed_and_by_the_spec() {
    let fx = Fixture::new(&["c"]);
    let dir = tempfile::tempdir().unwrap();
    let policy = fx.write_sim_policy(dir.path());
    let state = launcher_state(&fx, dir.path());
    let (p, traces) = (policy.display().to_string(), fx.traces.display().to_string());
    let out = fx.outs["c"].to_string();
    let base = ["provenance", "--policy", &p, "--traces", &traces];

    record_step_times(&fx);
    let plain = vouch(&state, &[&base[..], &[&out]].concat());
    assert_eq!(plain.status.code(), Some(0), "{}", text(&plain));
    let st: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    let pred = &st["predicate"];
    assert_eq!(pred["buildDefinition"]["buildType"], build_trace::provenance::BUILD_TYPE);
    assert_eq!(pred["runDetails"]["builder"]["id"], "urn:vouch:builder:simulated:rule:sim");
    assert_eq!(pred["runDetails"]["metadata"]["startedOn"], "2023-11-14T22:13:20Z");
    assert_eq!(pred["runDetails"]["metadata"]["finishedOn"], "2023-11-14T22:14:21Z");
    let byproducts = pred["runDetails"]["byproducts"].as_array().unwrap();
    let report_data = byproducts.iter().find(|b| b["name"] == "REPORT_DATA").unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(report_data["content"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes.len(), 64, "REPORT_DATA's 64 bytes, base64");
    // The buildType is documented.
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/provenance.md"),
    )
    .unwrap();
    assert!(docs.contains(build_trace::provenance::BUILD_TYPE));

    independent_implementation_accepts(dir.path(), &plain.stdout, &st, &bytes, &out);
    signed_envelopes_verify(&fx, dir.path(), &state, &[&base[..], &["--sign", &out]].concat(), &st);
}

/// The launcher's state directory under `dir`, holding the fixture's key where the launcher
/// keeps it.
fn launcher_state(fx: &Fixture, dir: &Path) -> PathBuf {
    let state = dir.join("state");
    let keys = state.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let name = fx.key.name().to_owned();
    std::fs::write(keys.join(format!("{name}.secret")), fx.key.to_file_string()).unwrap();
    let public = fx.key.public_key().to_string();
    std::fs::write(keys.join(format!("{name}.public")), &public).unwrap();
    state
}

/// When the launcher ran `c`'s step, as it records it beside the statement.
fn record_step_times(fx: &Fixture) {
    let st_c = fx.steps.iter().find(|s| s.udrv == fx.drvs["c"]).unwrap();
    let step_dir = build_trace::store::TraceStore::open(&fx.traces)
        .unwrap()
        .step_dir(&st_c.statement.job.drv_path);
    for entry in std::fs::read_dir(&step_dir).unwrap() {
        std::fs::write(
            entry.unwrap().path().join(build_trace::provenance::TIMES_FILE),
            r#"{"started_unix": 1700000000, "finished_unix": 1700000061}"#,
        )
        .unwrap();
    }
}

/// The checker of `tests/provenance_slsa.py` (in-toto's bindings, and `cryptography` for DSSE).
fn python_checker() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/provenance_slsa.py")
}

/// in-toto's own bindings accept the export (`plain`, the statement `st` of `out`), and refuse
/// what the old export wrote: REPORT_DATA (`report_data`) in hex where the spec wants base64.
fn independent_implementation_accepts(
    dir: &Path,
    plain: &[u8],
    st: &serde_json::Value,
    report_data: &[u8],
    out: &str,
) {
    let file = dir.join("provenance.jsonl");
    std::fs::write(&file, plain).unwrap();
    let script = python_checker();
    let py = Command::new("python3").arg(&script).arg(&file).output().expect("python3");
    assert!(
        py.status.success(),
        "in-toto-attestation refused it (scripts/setup-host.sh installs the package): {}",
        text(&py)
    );
    assert!(text(&py).contains(&format!("ok {out}")), "{}", text(&py));
    let mut old = st.clone();
    let byproducts = st["predicate"]["runDetails"]["byproducts"].as_array().unwrap();
    let i = byproducts.iter().position(|b| b["name"] == "REPORT_DATA").unwrap();
    old["predicate"]["runDetails"]["byproducts"][i]["content"] = hex::encode(report_data).into();
    std::fs::write(&file, serde_json::to_vec(&old).unwrap()).unwrap();
    let py = Command::new("python3").arg(&script).arg(&file).output().unwrap();
    assert!(!py.status.success(), "hex accepted: {}", text(&py));
}

/// Signed (`sign_args`, with `--sign`): a DSSE envelope of `st` by the launcher key, checked by
/// an independent DSSE implementation and by `vouch provenance verify`; another key, a changed
/// byte and a file that is not an envelope are not verified.
fn signed_envelopes_verify(
    fx: &Fixture,
    dir: &Path,
    state: &Path,
    sign_args: &[&str],
    st: &serde_json::Value,
) {
    let name = fx.key.name().to_owned();
    let public = fx.key.public_key().to_string();
    let out = fx.outs["c"].to_string();
    let script = python_checker();
    let other_key =
        nix_formats::signing::SecretKey::from_seed(&name, [1; 32]).public_key().to_string();
    let signed = vouch(state, sign_args);
    assert_eq!(signed.status.code(), Some(0), "{}", text(&signed));
    let env: serde_json::Value = serde_json::from_slice(&signed.stdout).unwrap();
    assert_eq!(env["payloadType"], "application/vnd.in-toto+json");
    assert_eq!(env["signatures"][0]["keyid"], name.as_str());
    let payload =
        base64::engine::general_purpose::STANDARD.decode(env["payload"].as_str().unwrap()).unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&payload).unwrap(), *st);
    let envelope = dir.join("envelope.json");
    std::fs::write(&envelope, &signed.stdout).unwrap();
    let e = envelope.display().to_string();
    // The envelope checked by an independent DSSE implementation (Python, `cryptography`).
    let py = Command::new("python3").arg(&script).args(["--dsse", &e, &public]).output().unwrap();
    assert!(py.status.success(), "{}", text(&py));
    assert!(text(&py).contains(&format!("ok {out}")), "{}", text(&py));
    let py =
        Command::new("python3").arg(&script).args(["--dsse", &e, &other_key]).output().unwrap();
    assert!(!py.status.success(), "another key accepted: {}", text(&py));
    let ok = vouch(state, &["provenance", "verify", &e]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(text(&ok).contains(&format!("ok {out}")), "{}", text(&ok));
    let ok = vouch(dir, &["provenance", "verify", "--key", &public, &e]);
    assert_eq!(ok.status.code(), Some(0), "explicit key: {}", text(&ok));
    // Another key: not verified.
    let other = other_key.clone();
    let no = vouch(state, &["provenance", "verify", "--key", &other, &e]);
    assert_eq!(no.status.code(), Some(1), "{}", text(&no));
    assert!(text(&no).contains("NOT VERIFIED"), "{}", text(&no));
    // One changed byte of the payload: not verified.
    let mut tampered = st.clone();
    tampered["subject"][0]["name"] = fx.outs["a"].to_string().into();
    let mut env2 = env.clone();
    env2["payload"] = base64::engine::general_purpose::STANDARD
        .encode(serde_json::to_vec(&tampered).unwrap())
        .into();
    std::fs::write(&envelope, serde_json::to_vec(&env2).unwrap()).unwrap();
    let no = vouch(state, &["provenance", "verify", &e]);
    assert_eq!(no.status.code(), Some(1), "{}", text(&no));
    // Not an envelope: bad input.
    std::fs::write(&envelope, b"{}").unwrap();
    let bad = vouch(state, &["provenance", "verify", &e]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
}
