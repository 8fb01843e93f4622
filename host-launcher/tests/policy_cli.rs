//! `vouch policy init|check` and `vouch key show`, run as the built binary: a policy written
//! from an image manifest (genuine) and from the state directory's simulated root (whose
//! evidence it then accepts), policies that put keys in the wrong place, and the public keys
//! a policy names.

use std::path::Path;
use std::process::{Command, Output};

use build_trace::evidence::{EvidenceBundle, Expected, Verifier};
use build_trace::trust::TrustPolicy;

use test_support::nix::text;

fn vouch(args: &[&str], state: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vouch"))
        .args(args)
        .env("VOUCH_STATE_DIR", state)
        .output()
        .expect("run vouch")
}

const SNP_M: &str = "377d0e1eebe8cf07dbc412054bd98c1022ce1694c2253a5e2c7e1d5180d182ea2019c5e023c469fe4c2544845832dd4c";

/// The image's 2-vCPU launch.
const SNP_M2: &str = "11d0e1eebe8cf07dbc412054bd98c1022ce1694c2253a5e2c7e1d5180d182ea2019c5e023c469fe4c2544845832dd4c3";

/// An image manifest (only what a policy reads has to be right), with or without SNP.
fn manifest(dir: &Path, sim: &str, snp: bool) -> std::path::PathBuf {
    let d = serde_json::json!({ "file": "f", "sha256": "00".repeat(32), "size": 1 });
    let snp = snp.then(|| {
        serde_json::json!({
            "ovmf": d, "vcpus": 1, "vcpu_type": "EPYC-v4", "guest_features": 1, "vmm_type": "qemu",
            "expected_measurement": SNP_M,
            "measurements": [
                { "vcpus": 1, "vcpu_type": "EPYC-v4", "measurement": SNP_M },
                { "vcpus": 2, "vcpu_type": "EPYC-v4", "measurement": SNP_M2 },
            ],
        })
    });
    let m = serde_json::json!({
        "format": vm_image::image::MANIFEST_FORMAT, "agent_version": "vouch-agent 0", "agent_sha256": "00".repeat(32),
        "kernel_key": { "source": "s", "gcc": "g", "ld": "l", "fragment_sha256": "00".repeat(32), "build_path": "/b" },
        "vmlinux": d, "bzimage": d, "initrd": d, "cmdline": "c", "cmdline_sha256": "00".repeat(32),
        "simulated_measurement": sim, "snp": snp,
    });
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("manifest.json");
    std::fs::write(&p, m.to_string()).unwrap();
    p
}

#[test]
fn init_simulated_writes_a_policy_that_accepts_this_hosts_evidence() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let sim = "ab".repeat(48);
    let image = s.join("image");
    manifest(&image, &sim, true);
    let img = image.to_str().unwrap();
    // No simulated root yet: a named error, exit 2.
    let out = vouch(&["policy", "init", "--simulated", "--image", img], s);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no simulated root"), "{}", text(&out));

    let ev = s.join("ev");
    let made =
        vouch(&["evidence", "simulate", "--out", ev.to_str().unwrap(), "--measurement", &sim], s);
    assert_eq!(made.status.code(), Some(0), "{}", text(&made));
    let policy = s.join("dev.toml");
    let p = policy.to_str().unwrap();
    let out = vouch(&["policy", "init", "--simulated", "--image", img, "-o", p], s);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let written = std::fs::read_to_string(&policy).unwrap();
    assert!(written.contains("# SIMULATED evidence"), "{written}");
    assert!(written.contains(&sim), "commented measurement: {written}");
    // Not replaced a second time.
    let again = vouch(&["policy", "init", "--simulated", "--image", img, "-o", p], s);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("not replacing"), "{}", text(&again));

    // The key id is this state directory's root, as `key show` prints it.
    let keys = vouch(&["key", "show", "--json"], s);
    let k: serde_json::Value = serde_json::from_slice(&keys.stdout).unwrap();
    let root = k["simulated_root"].as_str().unwrap();
    assert!(text(&made).contains(&format!("key id {root}")), "{}", text(&made));
    assert!(written.contains(&format!("simulated_roots = [\"{root}\"]")), "{written}");

    // Ready: the rule accepts the simulated report of this image's measurement, and only it.
    let prepared = TrustPolicy::load(&policy).unwrap().prepare().unwrap();
    let (_, rule) = &prepared.rules[0];
    let bundle = EvidenceBundle {
        report: std::fs::read(ev.join("report.bin")).unwrap(),
        vek: std::fs::read(ev.join("vcek.der")).unwrap(),
        ask: None,
        ark: std::fs::read(ev.join("ark.der")).unwrap(),
        provider: None,
    };
    let v = Verifier::new().verify(&bundle, rule, &Expected::default()).unwrap();
    assert!(v.is_simulated());
    let mut other = rule.clone();
    // Through the TOML/JSON form: a list, whatever the Rust type holding it.
    other.measurements = serde_json::from_value(serde_json::json!([SNP_M])).unwrap();
    assert!(Verifier::new().verify(&bundle, &other, &Expected::default()).is_err());

    let check = vouch(&["policy", "check", p], s);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
    assert!(text(&check).contains("one chip passing builder rule `dev-simulated`"));
    assert!(text(&check).contains("SIMULATED root"), "{}", text(&check));
}

#[test]
fn init_from_an_image_manifest_pins_its_snp_measurement() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let m = manifest(&s.join("image"), &"cd".repeat(48), true);
    let mf = m.to_str().unwrap();
    let out = vouch(&["policy", "init", "--manifest", mf], s);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let written = String::from_utf8(out.stdout).unwrap();
    assert!(written.contains("products = [\"Genoa\", \"Turin\"]"), "{written}");
    assert!(written.contains(&format!("#   1 vCPU EPYC-v4 (default): {SNP_M}\n")), "{written}");
    assert!(written.contains(&format!("#   2 vCPU EPYC-v4: {SNP_M2}\n")), "{written}");
    let policy = TrustPolicy::from_toml(&written).unwrap().prepare().unwrap();
    let ev = &policy.rules[0].1;
    let pinned = serde_json::json!([SNP_M, SNP_M2]);
    assert_eq!(serde_json::to_value(&ev.measurements).unwrap(), pinned);
    assert!(ev.simulated_roots.is_empty());
    let path = s.join("prod.toml");
    std::fs::write(&path, &written).unwrap();
    let check = vouch(&["policy", "check", "--json", path.to_str().unwrap()], s);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
    let v: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["builders"]["image"]["measurements"], 2);
    assert_eq!(v["builders"]["image"]["roots"], serde_json::json!(["AMD Genoa", "AMD Turin"]));

    let milan = vouch(&["policy", "init", "--manifest", mf, "--products", "Milan,Genoa"], s);
    assert_eq!(milan.status.code(), Some(0), "{}", text(&milan));
    assert!(text(&milan).contains("products = [\"Milan\", \"Genoa\"]"), "{}", text(&milan));
    let bad = vouch(&["policy", "init", "--manifest", mf, "--products", "Naples"], s);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    // An image without an SNP measurement cannot be matched by genuine evidence.
    let plain = manifest(&s.join("plain"), &"cd".repeat(48), false);
    let out = vouch(&["policy", "init", "--manifest", plain.to_str().unwrap()], s);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--simulated"), "{}", text(&out));
}

fn check(policy: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, policy).unwrap();
    let out = vouch(&["policy", "check", path.to_str().unwrap()], dir.path());
    (out.status.code(), text(&out))
}

#[test]
fn check_says_where_a_misplaced_key_belongs() {
    // An evidence policy where a trust policy is expected: today's trap.
    let (code, out) =
        check("products = [\"Genoa\"]\nallow_vlek = false\n[min_tcb.Genoa]\nsnp = 21\n");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("this is an evidence policy"), "{out}");
    assert!(out.contains("[builders.NAME.evidence]"), "{out}");
    assert!(out.contains("INVALID"), "{out}");
    // `require` written after a table lands in it.
    let key = "cache-a-1:VUYbT40EiqxQ8DDKsJ/c9NK0yyRRy+wb6+5kY20F++g=";
    let (code, out) =
        check(&format!("[keys]\n\"cache-a-1\" = \"{key}\"\nrequire = \"key:cache-a-1\"\n"));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("[keys]: `require` belongs at the top level"), "{out}");
    // Evidence keys directly in a builder rule.
    let (code, out) = check("require = \"builder:b\"\n[builders.b]\nproducts = [\"Genoa\"]\n");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("`products` belongs under [builders.b.evidence]"), "{out}");
    // A key string under the wrong name.
    let (code, out) = check(&format!("require = \"key:b\"\n[keys]\nb = \"{key}\"\n"));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("named `cache-a-1`"), "{out}");
    // Not TOML at all; a file that is not there (exit 2).
    let (code, out) = check("require = \n");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not TOML"), "{out}");
    let out = vouch(&["policy", "check", "/nonexistent.toml"], Path::new("/nonexistent"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn check_explains_which_signers_could_satisfy_a_policy() {
    let spare = nix_formats::signing::SecretKey::from_seed("spare-1", [3; 32]).public_key();
    let (code, out) = check(&format!(
        "require = {{ threshold = 2, of = [\"key:cache-a-1\", \"key:cache-b-1\", {{ builder = \"prod\", at_least = 2 }}] }}\n\
         [keys]\n\"cache-a-1\" = \"cache-a-1:VUYbT40EiqxQ8DDKsJ/c9NK0yyRRy+wb6+5kY20F++g=\"\n\
         \"cache-b-1\" = \"cache-b-1:udPDPw1YI0fpOJ7PVK3RRukjsban9jSncnRyYOY45vo=\"\n\
         \"spare-1\" = \"{spare}\"\n\
         [builders.prod.evidence]\nproducts = [\"Genoa\"]\nmeasurements = [\"{SNP_M}\"]\n",
    ));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("  - Nix key `cache-a-1` + Nix key `cache-b-1`\n"), "{out}");
    assert!(
        out.contains("  - Nix key `cache-b-1` + 2 distinct chips passing builder rule `prod`\n"),
        "{out}"
    );
    assert!(out.contains("VLEK refused, VMPL 0, 1 launch measurement(s) allowed"), "{out}");
    assert!(!out.contains("Milan"), "{out}");
    assert!(out.contains("key:spare-1 is defined but the requirement never names it"), "{out}");
}

#[test]
fn key_show_prints_the_nix_public_key_line() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let none = vouch(&["key", "show"], s);
    assert_eq!(none.status.code(), Some(0), "{}", text(&none));
    assert!(text(&none).contains("no Nix signing key yet"), "{}", text(&none));
    assert!(text(&none).contains("no simulated SNP root"), "{}", text(&none));
    let key = build_trace::sign::load_or_generate_key(s, "ci-a-simulated-1").unwrap();
    std::fs::write(s.join("key-name"), "ci-a-simulated-1\n").unwrap();
    let line = key.public_key().to_string();
    let out = vouch(&["key", "show"], s);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("Nix public key ci-a-simulated-1: {line}\n")),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains(&format!("[keys] \"ci-a-simulated-1\" = \"{line}\"")));
    let json = vouch(&["key", "show", "--json"], s);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["nix_keys"]["ci-a-simulated-1"], line.as_str());
    assert_eq!(v["signing_name"]["simulated"], "ci-a-simulated-1");
    assert!(!text(&json).contains("secret"), "{}", text(&json));
}

#[test]
fn each_kind_of_policy_given_for_the_other_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let evidence = d.join("evidence.toml");
    std::fs::write(&evidence, "products = [\"Genoa\"]\nallow_vlek = false\n").unwrap();
    let drv = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x.drv";
    let out = vouch(&["verify", "--policy", evidence.to_str().unwrap(), drv], d);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("this is an evidence policy"), "{err}");
    assert!(err.contains("[builders.NAME.evidence]"), "{err}");
    assert!(err.contains("unknown field `allow_vlek`"), "the schema's own error too: {err}");

    let trust = d.join("trust.toml");
    std::fs::write(
        &trust,
        "require = \"builder:b\"\n[builders.b.evidence]\nproducts = [\"Milan\"]\n",
    )
    .unwrap();
    let snp = test_support::snp::testdata();
    let args = [
        "evidence",
        "check",
        "--report",
        &snp.join("trustee/test-report.bin").display().to_string(),
        "--cert",
        &snp.join("trustee/test-vcek.der").display().to_string(),
        "--policy",
        trust.to_str().unwrap(),
    ]
    .map(|s| s.to_string());
    let out = Command::new(env!("CARGO_BIN_EXE_vouch")).args(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("this is a trust policy"), "{err}");
}
