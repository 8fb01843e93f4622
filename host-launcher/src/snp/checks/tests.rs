use super::*;
use crate::snp::platform::PlatformStatus;
use build_trace::evidence::report::Product;

fn manifest(snp: bool) -> Manifest {
    let snp = if snp {
        r#"{"ovmf": {"file": "OVMF.amdsev.fd", "sha256": "ab", "size": 1}, "vcpus": 1,
            "vcpu_type": "EPYC-v4", "guest_features": 1, "vmm_type": "qemu",
            "expected_measurement": "cd"}"#
    } else {
        "null"
    };
    let f = |n: &str| format!(r#"{{"file": "{n}", "sha256": "00", "size": 1}}"#);
    serde_json::from_str(&format!(
        r#"{{"format": "vouch-image-manifest-v1", "agent_version": "vouch-agent 0.1.0",
        "agent_sha256": "00", "kernel_key": {{"source": "s", "gcc": "g", "ld": "l",
        "fragment_sha256": "00", "build_path": "/b"}}, "vmlinux": {}, "bzimage": {},
        "initrd": {}, "cmdline": "c", "cmdline_sha256": "00",
        "simulated_measurement": "97cca7c76ee0b7d9454bfe3f649973ea", "snp": {snp}}}"#,
        f("vmlinux"),
        f("bzImage"),
        f("initrd.cpio")
    ))
    .unwrap()
}

fn status(flags: u32, reported_snp: u8) -> PlatformStatus {
    let mut b = [0u8; 32];
    b[0] = 1;
    b[1] = 55;
    b[2] = 1;
    b[3] = 1;
    b[8..12].copy_from_slice(&flags.to_le_bytes());
    b[16..24].copy_from_slice(&[3, 0, 0, 0, 0, 0, 8, 115]);
    b[24..32].copy_from_slice(&[3, 0, 0, 0, 0, 0, reported_snp, 115]);
    PlatformStatus::decode(&b)
}

/// A Milan host where everything is in place.
fn good_snp_host() -> Facts {
    Facts {
        caps: HostCaps {
            kvm_dev: true,
            hw_virt: true,
            kvm_snp: true,
            dev_sev: true,
            vhost_vsock: true,
        },
        sev_snp_param: Some("Y".into()),
        platform: Ok(Platform {
            status: status(0, 8),
            chip_id: Some(vec![1; 64]),
            product: Some(Product::Milan),
        }),
        qemu: Ok("QEMU emulator version 10.0.2".into()),
        qemu_snp_object: true,
        image: ("/img".into(), Ok(manifest(true))),
        vsock_daemon: None,
        vcek: VcekFact::Found("/state/snp/certs/Milan/x/vcek.der".into()),
    }
}

fn by_name<'a>(checks: &'a [Check], name: &str) -> &'a Check {
    checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no check {name}"))
}

#[test]
fn a_complete_host_passes_every_check() {
    let checks = evaluate(&good_snp_host());
    assert!(checks.iter().all(|c| c.status == Status::Ok && c.fix.is_none()), "{checks:#?}");
    let fw = by_name(&checks, "snp-firmware");
    assert!(fw.detail.contains("Milan, SNP firmware 1.55 (build 0), state INIT"), "{}", fw.detail);
    assert!(fw.detail.contains("reported TCB bootloader=3 tee=0 snp=8 microcode=115"));
    assert!(by_name(&checks, "ovmf").detail.contains("expected SNP measurement cd"));
}

#[test]
fn every_failure_names_its_fix() {
    let mut f = good_snp_host();
    f.vcek =
        VcekFact::Missing("/state/snp/certs/Milan/01/bl03-tee00-snp08-ucode115/vcek.der".into());
    f.platform.as_mut().unwrap().status = status(0b111, 8);
    f.image.1 = Ok(manifest(false));
    let failing = snp_failures(&f);
    let names: Vec<_> = failing.iter().map(|c| c.name).collect();
    assert_eq!(names, ["mask-chip-key", "mask-chip-id", "vlek", "vcek", "ovmf"]);
    assert!(failing.iter().all(|c| c.fix.is_some()));
    assert!(by_name(&failing, "vcek").fix.as_deref().unwrap().contains("vouch snp certs fetch"));
    assert!(by_name(&failing, "ovmf").fix.as_deref().unwrap().contains("build-ovmf-amdsev.sh"));
    let e = PreflightError(failing).to_string();
    assert!(e.starts_with("SEV-SNP preflight failed, no VM was started:\n  mask-chip-key:"), "{e}");
}

#[test]
fn a_host_without_snp_fails_the_snp_checks_only() {
    let mut f = good_snp_host();
    f.caps = HostCaps {
        kvm_dev: false,
        hw_virt: false,
        kvm_snp: false,
        dev_sev: false,
        vhost_vsock: false,
    };
    f.sev_snp_param = None;
    f.platform = Err("/dev/sev is missing".into());
    f.vcek = VcekFact::NoIdentity;
    f.qemu_snp_object = true;
    f.vsock_daemon = Some("/bin/vhost-device-vsock".into());
    let checks = evaluate(&f);
    let failing: Vec<_> = checks.iter().filter(|c| c.status == Status::Fail).collect();
    assert!(failing.iter().all(|c| c.needed == Needed::Snp), "{failing:#?}");
    let names: Vec<_> = failing.iter().map(|c| c.name).collect();
    assert_eq!(names, ["kvm", "kvm_amd-sev_snp", "/dev/sev", "snp-firmware", "vcek"]);
    assert!(by_name(&checks, "kvm_amd-sev_snp").detail.ends_with("(missing)"));
}

#[test]
fn a_held_back_reported_tcb_warns() {
    let mut f = good_snp_host();
    f.platform.as_mut().unwrap().status = status(0, 7);
    let checks = evaluate(&f);
    let w = by_name(&checks, "reported-tcb");
    assert_eq!(w.status, Status::Warn);
    assert!(w.detail.contains("snp=7") && w.detail.contains("snp=8"), "{}", w.detail);
    assert!(snp_failures(&f).is_empty(), "a warning does not stop a build");
}

#[test]
fn the_vcek_is_looked_up_by_chip_and_reported_tcb() {
    let report = include_bytes!("../../../tests/data/snp/report_milan.bin");
    let vcek = include_bytes!("../../../tests/data/snp/vcek_milan.der");
    let id = HostIdentity::from_report(report, Some(Product::Milan)).unwrap();
    let t = tempfile::tempdir().unwrap();
    assert!(matches!(find_vcek(Some(&id), t.path(), None), VcekFact::Missing(_)));
    let cache = CertCache::new(t.path());
    cache.store_vcek(&id, vcek).unwrap();
    assert!(matches!(find_vcek(Some(&id), t.path(), None), VcekFact::Found(_)));
    // After a TCB change the cached VCEK no longer applies.
    let mut newer = id.clone();
    newer.tcb.microcode += 1;
    assert!(matches!(find_vcek(Some(&newer), t.path(), None), VcekFact::Missing(_)));
    // A configured VCEK of another chip is refused, naming why.
    let other = t.path().join("other.der");
    std::fs::write(&other, include_bytes!("../../../tests/data/snp/test-vcek.der")).unwrap();
    match find_vcek(Some(&id), t.path(), Some(&other)) {
        VcekFact::Bad(p, why) => assert!(p == other && why.contains("chip"), "{why}"),
        v => panic!("{v:?}"),
    }
    assert_eq!(find_vcek(None, t.path(), None), VcekFact::NoIdentity);
}
