//! Tests of the QEMU command line: the argv per mode (TCG with vhost-user vsock, KVM with
//! kernel vsock, SNP exactly), refusals (debug policy, missing SNP settings), the NIC only
//! where asked, mode choice and `/proc/cpuinfo` flags, and the real QEMU 10 parsing our SNP
//! argv.
//!
//! What is not here: booting a guest (`tests/tests/vm_*.rs`).

use super::*;

fn spec(mode: Mode, vsock: VsockDevice) -> QemuSpec {
    QemuSpec {
        mode,
        kernel: "/img/vmlinux".into(),
        initrd: "/img/initrd.cpio".into(),
        cmdline: "console=ttyS0 quiet panic=-1 vouch.port=1024".into(),
        memory_mib: 1024,
        vcpus: 1,
        vsock,
        snp: None,
        network: None,
    }
}

fn snp_launch() -> SnpLaunch {
    SnpLaunch {
        ovmf: "/img/OVMF.amdsev.fd".into(),
        host_data: [0xab; 32],
        policy: SNP_POLICY,
        cbitpos: 51,
        reduced_phys_bits: 1,
        cpu_model: "EPYC-v4".into(),
    }
}

#[test]
fn tcg_argv_with_vhost_user_vsock() {
    let s = spec(Mode::Tcg, VsockDevice::User { socket: "/run/vm,1/vhost.sock".into() });
    let argv = qemu_argv(&s).unwrap();
    let want = [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-accel",
        "tcg",
        "-cpu",
        "qemu64,+rdrand,+ssse3,+sse4.1,+sha-ni",
        "-machine",
        "q35,memory-backend=mem",
        "-smp",
        "1",
        "-m",
        "1024M",
        "-object",
        "memory-backend-memfd,id=mem,size=1024M,share=on",
        "-kernel",
        "/img/vmlinux",
        "-initrd",
        "/img/initrd.cpio",
        "-append",
        "console=ttyS0 quiet panic=-1 vouch.port=1024",
        "-chardev",
        "stdio,id=con,signal=off",
        "-serial",
        "chardev:con",
        "-chardev",
        "socket,id=vsock,path=/run/vm,,1/vhost.sock",
        "-device",
        "vhost-user-vsock-pci,chardev=vsock",
        "-nic",
        "none",
    ];
    assert_eq!(argv, want);
}

#[test]
fn kvm_argv_with_kernel_vsock() {
    let argv = qemu_argv(&spec(Mode::Kvm, VsockDevice::Kernel { cid: 77 })).unwrap();
    assert_eq!(
        &argv[5..11],
        ["-accel", "kvm", "-cpu", "host", "-machine", "q35,memory-backend=mem"]
    );
    assert!(argv.windows(2).any(|w| w == ["-device", "vhost-vsock-pci,guest-cid=77"]));
    assert_eq!(argv.last().unwrap(), "none");
}

#[test]
fn snp_argv_exactly() {
    let mut s = spec(Mode::Snp, VsockDevice::User { socket: "/run/vm/vhost.sock".into() });
    s.kernel = "/img/bzImage".into();
    s.snp = Some(snp_launch());
    let argv = qemu_argv(&s).unwrap();
    let hd = "q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=";
    let want = [
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-accel", "kvm", "-cpu", "EPYC-v4",
        "-machine", "q35,confidential-guest-support=sev0,memory-backend=mem,vmport=off",
        "-object",
        &format!("sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on,policy=0x30000,host-data={hd}"),
        "-bios", "/img/OVMF.amdsev.fd",
        "-smp", "1", "-m", "1024M",
        "-object", "memory-backend-memfd,id=mem,size=1024M,share=on",
        "-kernel", "/img/bzImage", "-initrd", "/img/initrd.cpio",
        "-append", "console=ttyS0 quiet panic=-1 vouch.port=1024",
        "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
        "-chardev", "socket,id=vsock,path=/run/vm/vhost.sock",
        "-device", "vhost-user-vsock-pci,chardev=vsock,iommu_platform=on,disable-legacy=on",
        "-nic", "none",
    ];
    assert_eq!(argv, want);
}

#[test]
fn snp_refuses_debug_policy_and_missing_settings() {
    let mut s = spec(Mode::Snp, VsockDevice::Kernel { cid: 3 });
    assert_eq!(qemu_argv(&s), Err(ArgvError::MissingSnp));
    s.snp = Some(SnpLaunch { policy: SNP_POLICY | (1 << 19), ..snp_launch() });
    assert_eq!(qemu_argv(&s), Err(ArgvError::DebugPolicy(0xb0000)));
}

#[test]
fn network_only_when_asked() {
    let mut s = spec(Mode::Tcg, VsockDevice::Kernel { cid: 3 });
    assert!(!qemu_argv(&s).unwrap().iter().any(|a| a.contains("netdev")));
    assert!(qemu_argv(&s).unwrap().windows(2).any(|w| w == ["-nic", "none"]));
    s.network = Some(network::grant_for_tests());
    let argv = qemu_argv(&s).unwrap();
    assert!(argv.iter().any(|a| a == network::USER_NETDEV));
    assert!(argv.iter().any(|a| a == "virtio-net-pci,netdev=net0"));
    assert!(!argv.iter().any(|a| a == "-nic"));
    // In SNP mode the NIC is an iommu_platform device like every other virtio device.
    let mut s = spec(Mode::Snp, VsockDevice::Kernel { cid: 3 });
    s.snp = Some(snp_launch());
    s.network = Some(network::grant_for_tests());
    let argv = qemu_argv(&s).unwrap();
    assert!(argv
        .iter()
        .any(|a| a == "virtio-net-pci,netdev=net0,iommu_platform=on,disable-legacy=on"));
}

#[test]
fn mode_choice() {
    let none = HostCaps::default();
    let kvm = HostCaps { kvm_dev: true, hw_virt: true, ..HostCaps::default() };
    let snp = HostCaps { kvm_snp: true, dev_sev: true, ..kvm.clone() };
    // Our CI: /dev/kvm opens but no svm/vmx.
    let pvm = HostCaps { kvm_dev: true, ..HostCaps::default() };
    assert_eq!(choose_mode(None, &none, true), Ok(Mode::Tcg));
    assert_eq!(choose_mode(None, &pvm, true), Ok(Mode::Tcg));
    assert_eq!(choose_mode(None, &kvm, true), Ok(Mode::Kvm));
    assert_eq!(choose_mode(None, &snp, true), Ok(Mode::Snp));
    assert_eq!(choose_mode(None, &snp, false), Ok(Mode::Kvm));
    assert_eq!(choose_mode(Some(Mode::Tcg), &snp, true), Ok(Mode::Tcg));
    assert!(matches!(choose_mode(Some(Mode::Kvm), &pvm, true), Err(ModeError::NoKvm { .. })));
    assert!(matches!(choose_mode(Some(Mode::Snp), &kvm, true), Err(ModeError::NoSnp(_))));
    assert!(matches!(choose_mode(Some(Mode::Snp), &snp, false), Err(ModeError::NoSnp(_))));
}

#[test]
fn cpuinfo_flags() {
    assert!(cpuinfo_has_hw_virt("processor: 0\nflags\t\t: fpu vme svm lm\n"));
    assert!(cpuinfo_has_hw_virt("flags : vmx\n"));
    assert!(!cpuinfo_has_hw_virt("flags : fpu hypervisor svm_lock\nbugs : svm\n"));
}

/// Real QEMU 10 parses our snp argv: under TCG it gets as far as setting up private guest
/// memory and fails with the known "KVM required" error (no SNP hardware here).
#[test]
fn qemu_parses_the_snp_argv() {
    let t = tempfile::tempdir().unwrap();
    let file = |n: &str| {
        let p = t.path().join(n);
        std::fs::write(&p, b"x").unwrap();
        p
    };
    let mut s = spec(Mode::Snp, VsockDevice::Kernel { cid: 3 });
    s.kernel = file("bzImage");
    s.initrd = file("initrd");
    s.snp = Some(SnpLaunch { ovmf: file("ovmf.fd"), ..snp_launch() });
    let mut argv = qemu_argv(&s).unwrap();
    // Same arguments, but TCG instead of KVM (this machine has no SNP).
    argv[6] = "tcg".into();
    let out = std::process::Command::new("qemu-system-x86_64")
        .args(&argv)
        .output()
        .expect("qemu-system-x86_64 must be installed (scripts/setup-host.sh)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot set up private guest memory for sev-snp-guest: KVM required"),
        "unexpected QEMU error: {err}"
    );
    // A malformed host-data is caught by QEMU at parse time: proves the option is read.
    let bad: Vec<String> = argv
        .iter()
        .map(|a| match a.split_once(",host-data=") {
            Some((head, _)) => format!("{head},host-data=AAAA"),
            None => a.clone(),
        })
        .collect();
    let out = std::process::Command::new("qemu-system-x86_64").args(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not equal to 32"), "unexpected QEMU error: {err}");
}
