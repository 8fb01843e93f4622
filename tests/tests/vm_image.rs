//! The `vouch image` and `vouch doctor` commands, run as the real binary (no VM boots here).

use std::path::PathBuf;
use std::process::Command;

use test_support::vm::{image_dir, vouch_bin};

fn snp_vectors() -> PathBuf {
    test_support::snp::testdata().join("virtee-sev")
}

fn vouch(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(vouch_bin()).args(args).output().expect("running vouch");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `vouch image measure` reproduces the virtee/sev launch-digest vectors (README in
/// test-support/data/snp; cross-checked there with sev-snp-measure).
#[test]
fn image_measure_reproduces_the_virtee_vectors() {
    let ovmf = snp_vectors().join("ovmf_AmdSev_suffix.bin");
    let ovmf = ovmf.to_str().unwrap();
    let base = [
        "image",
        "measure",
        "--ovmf",
        ovmf,
        "--kernel",
        "/dev/null",
        "--initrd",
        "/dev/null",
        "--vcpus",
        "1",
        "--vcpu-type",
        "EPYC-v4",
    ];
    let mut a = base.to_vec();
    a.extend(["--append", "console=ttyS0 loglevel=7", "--guest-features", "0x1"]);
    let (ok, out, err) = vouch(&a);
    assert!(ok, "{err}");
    assert!(out.contains("measurement: 6d287813eb5222d770f75005c664e34c204f385ce832cc2ce7d0d6f354454362f390ef83a92046c042e706363b4b08fa"), "{out}");
    let mut a = base.to_vec();
    a.extend(["--append", "console=ttyS0 loglevel=7", "--guest-features", "0x21"]);
    let (_, out, _) = vouch(&a);
    assert!(out.contains("measurement: 803f691094946e42068aaa3a8f9e26a5c89f36f7b73ecfb28c653360fe4b3aba7e534442e7e1e17895dfe778d0228977"), "{out}");
    let mut a = base.to_vec();
    a.extend([
        "--ovmf-hash",
        "086e2e9149ebf45abdc3445fba5b2da8270bdbb04094d7a2c37faaa4b24af3aa16aff8c374c2a55c467a50da6d466b74",
    ]);
    let (_, out, _) = vouch(&a);
    assert!(out.contains("measurement: ddc5224521617a536ee7ce9dd6224d1b58a8d4fda1c741f3ac99fc4bfa04ba6e9fc98646d4a07a9079397fa3852819b5"), "{out}");

    // A non-AmdSev OVMF cannot measure a direct kernel boot.
    let plain = snp_vectors().join("ovmf_OvmfX64_suffix.bin");
    let (ok, _, err) =
        vouch(&["image", "measure", "--ovmf", plain.to_str().unwrap(), "--kernel", "/dev/null"]);
    assert!(!ok);
    assert!(err.contains("SNP_KERNEL_HASHES"), "{err}");
}

/// The built image's files match its manifest, and the manifest has what docs/vm.md promises.
#[test]
fn built_image_matches_its_manifest() {
    let dir = image_dir();
    let (ok, out, err) = vouch(&["image", "show", "--image", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("files match the manifest"), "{out}");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["format"], "vouch-image-manifest-v1");
    let agent = m["agent_version"].as_str().unwrap();
    assert!(agent.starts_with("vouch-agent "), "{agent}");
    assert!(!agent.ends_with("+bench"), "the real image's agent has no benchmark modes: {agent}");
    assert_eq!(m["simulated_measurement"].as_str().unwrap().len(), 96);
    assert!(m["kernel_key"]["source"].as_str().unwrap().contains("6.12"));
    assert!(
        !m["cmdline"].as_str().unwrap().contains("vouch.bench"),
        "the image command line has no benchmark switch"
    );
    // initrd: a newc archive with /init first-level entries, as GNU cpio reads it.
    let mut child = Command::new("cpio")
        .args(["-t", "--quiet"])
        .stdin(std::fs::File::open(dir.join("initrd.cpio")).unwrap())
        .output()
        .expect("cpio (scripts/setup-host.sh installs it)");
    assert!(child.status.success());
    let names = String::from_utf8(std::mem::take(&mut child.stdout)).unwrap();
    assert!(names.lines().any(|l| l == "init"), "{names}");
    assert!(names.lines().any(|l| l == "dev/console"), "{names}");
}

/// `vouch doctor` says, one line per check, what this host can do, with the fix of each failing
/// check, and names the mode; `--json` says the same.
#[test]
fn doctor_reports_each_check() {
    let dir = image_dir();
    let (ok, out, err) = vouch(&["doctor", "--image", dir.to_str().unwrap()]);
    assert!(ok, "doctor failed on a host that can build:\n{out}\n{err}");
    let checks = [
        "kvm",
        "kvm_amd-sev_snp",
        "/dev/sev",
        "snp-firmware",
        "vcek",
        "qemu",
        "sev-snp-guest",
        "image",
        "ovmf",
        "vsock",
        "network",
        "mode",
    ];
    for check in checks {
        assert!(
            out.lines().any(|l| l.split_whitespace().nth(1) == Some(check)),
            "no {check} line:\n{out}"
        );
    }
    for line in out.lines().filter(|l| l.starts_with("[no]")) {
        assert!(line.contains("; fix: "), "a failing check without its fix: {line}");
    }
    let (_, json, _) = vouch(&["doctor", "--json", "--image", dir.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["checks"].as_array().unwrap().len() + 1, out.lines().count(), "{json}");
    assert_eq!(v["can_build"], true);
    // This machine has no /dev/sev: `--snp` must fail.
    if !std::path::Path::new("/dev/sev").exists() {
        let (snp_ok, _, _) = vouch(&["doctor", "--snp", "--image", dir.to_str().unwrap()]);
        assert!(!snp_ok, "doctor --snp passed without SEV-SNP");
    }
    // On a host without svm/vmx the answer must be TCG, never KVM.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "svm" || f == "vmx"));
    if !hw {
        assert!(out.contains("would run tcg"), "{out}");
        assert!(out.contains("simulated"), "{out}");
    }
}
