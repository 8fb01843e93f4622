//! `vouch selftest` on this machine: no SEV-SNP here, so it must run the whole flow with
//! simulated evidence in a real VM (KVM where usable, else TCG), say so first, and show that
//! the default genuine-AMD policy rejects what it built.

use std::process::Command;

use test_support::vm::{image_dir, require_tool, vouch_bin};

#[test]
fn selftest_runs_the_simulated_flow_and_says_so() {
    require_tool("nix-instantiate", "scripts/setup-host.sh installs it (apt-get install nix-bin)");
    let t = tempfile::tempdir().unwrap();
    let report = t.path().join("report.txt");
    let out = Command::new(vouch_bin())
        .arg("--state-dir")
        .arg(t.path().join("state"))
        .args(["selftest", "--image"])
        .arg(image_dir())
        .arg("--output")
        .arg(&report)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vouch selftest failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&report).unwrap(),
        text,
        "--output writes the printed report"
    );
    let first = text.lines().nth(2).unwrap_or("");
    assert!(first.starts_with("SIMULATED: this host cannot run SEV-SNP guests"), "{text}");
    assert!(text.contains("[no  ] /dev/sev"), "the host checks are in the report:\n{text}");
    assert!(text.contains("-vouch-selftest in "), "the build and its output:\n{text}");
    assert!(text.contains("SIMULATED evidence (no SEV-SNP hardware involved)"), "{text}");
    assert!(
        text.contains("genuine-AMD policy: rejected, as simulated evidence must be (root"),
        "the genuine-AMD policy must reject simulated evidence:\n{text}"
    );
}
