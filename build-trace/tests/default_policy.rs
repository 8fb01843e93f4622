//! The default policy of `vouch verify` (issue 12, item 4) against real AMD-signed reports of
//! other people's SEV-SNP guests (Azure's Genoa and Milan VMs, AWS's VLEK): genuine evidence
//! that the old default ("any genuine SNP guest") accepted. The default now pins the launch
//! measurements of the image manifests it is given, requires AMD's bulletin TCB minimum, and
//! leaves Milan out.

mod evidence_support;

use build_trace::evidence::{Check, EvidencePolicy, Expected, Verifier};
use build_trace::trust::TrustPolicy;
use evidence_support::*;

/// The default policy's effective evidence policy with a manifest pinning `measurement`.
fn default_evidence(dir: &std::path::Path, measurement: &str) -> EvidencePolicy {
    let manifest = dir.join(format!("manifest-{}.json", &measurement[..8]));
    std::fs::write(
        &manifest,
        format!(r#"{{"snp": {{"expected_measurement": "{measurement}"}}, "simulated_measurement": "{}"}}"#, "00".repeat(48)),
    )
    .unwrap();
    let p = TrustPolicy::default_for(&[manifest.display().to_string()]).unwrap();
    p.prepare().unwrap().rules.remove(0).1
}

fn check(name: &str, policy: &EvidencePolicy) -> Result<(), Check> {
    let c = case(name);
    let want = Expected { host_data: Some(c.host_data), report_data: Some(c.report_data) };
    Verifier::new().verify_at(&c.bundle, policy, &want, c.now).map(|_| ()).map_err(|e| e.check())
}

#[test]
fn another_guests_genuine_report_no_longer_passes_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let ours = "ab".repeat(48);
    let genoa = case("trustee az-genoa");
    // The old default: genuine AMD evidence of any guest, any TCB, any product.
    let lax = EvidencePolicy::default();
    assert_eq!(check("trustee az-genoa", &lax), Ok(()), "the attack worked under the old default");
    assert_eq!(check("trustee az-milan", &lax), Ok(()));
    // The default now: another image's measurement is refused.
    let default = default_evidence(dir.path(), &ours);
    assert!(check("trustee az-genoa", &default).is_err());
    // (its TCB is checked first; without the minimum, the measurement is what refuses it)
    let no_floor = EvidencePolicy { min_tcb: Default::default(), ..default.clone() };
    assert_eq!(check("trustee az-genoa", &no_floor), Err(Check::Measurement));
    // Pinning that guest's own measurement, its TCB (SNP SPL 0x17, µcode 0x54, below
    // AMD-SB-3020/3027) is still refused.
    let pinned = default_evidence(dir.path(), genoa.measurement);
    assert_eq!(check("trustee az-genoa", &pinned), Err(Check::MinimumTcb));
    // Milan is off by default.
    let milan = default_evidence(dir.path(), case("trustee az-milan").measurement);
    assert_eq!(check("trustee az-milan", &milan), Err(Check::Root));
    // No VLEK.
    let vlek = default_evidence(dir.path(), case("trustee test-vlek").measurement);
    assert!(check("trustee test-vlek", &vlek).is_err());
}

#[test]
fn a_manifest_without_an_snp_measurement_is_refused_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.json");
    std::fs::write(&manifest, r#"{"snp": null, "simulated_measurement": "00"}"#).unwrap();
    let p = TrustPolicy::default_for(&[manifest.display().to_string()]).unwrap();
    let e = p.prepare().unwrap_err().to_string();
    assert!(e.contains("no SEV-SNP launch measurement") && e.contains("--image-manifest"), "{e}");
}

#[test]
fn a_manifest_lists_one_measurement_per_launch() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.json");
    let (one, four) = ("11".repeat(48), "44".repeat(48));
    std::fs::write(
        &manifest,
        format!(
            r#"{{"snp": {{"expected_measurement": "{one}", "measurements": [
                {{"vcpus": 1, "vcpu_type": "EPYC-v4", "measurement": "{one}"}},
                {{"vcpus": 4, "vcpu_type": "EPYC-Genoa", "measurement": "{four}"}}]}}}}"#
        ),
    )
    .unwrap();
    let p = TrustPolicy::default_for(&[manifest.display().to_string()]).unwrap();
    let ev = p.prepare().unwrap().rules.remove(0).1;
    let list: Vec<String> =
        ev.measurements.unwrap().list().unwrap().iter().map(|m| m.to_string()).collect();
    assert!(list.contains(&one) && list.contains(&four), "{list:?}");
}
