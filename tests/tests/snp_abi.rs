//! SEV-SNP ABI cross-checks that need no hardware:
//! - the `/dev/sev-guest` (`agent::sev_guest`) and `/dev/sev` (`host_launcher::snp::sys`) ioctl
//!   structs against Linux 6.12's own UAPI headers: a C program compiled against them prints
//!   every size, offset and request number our `LAYOUT` tables name, and where each bit field
//!   of `struct sev_user_data_snp_status` lands;
//! - the configfs-tsm attributes and sizes the agent uses against the kernel's ABI document and
//!   `include/linux/tsm.h`, and the certificate buffer against `SEV_FW_BLOB_MAX_SIZE`;
//! - vouch's SNP QEMU command line against QEMU itself: every property must be accepted (QEMU
//!   gets as far as asking for KVM), and the class properties are in `-object sev-snp-guest,help`.
//!
//! The headers and documents come from `scripts/setup-host.sh` (linux-libc-dev 6.12 from
//! bookworm-backports and three files of linux-source-6.12, unpacked under
//! `$VOUCH_CACHE/linux-uapi-6.12`); a missing one fails the test with that instruction.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use host_launcher::snp::platform::PlatformStatus;
use host_launcher::vm::{qemu_argv, Mode, QemuSpec, SnpLaunch, VsockDevice, SNP_POLICY};

fn uapi() -> PathBuf {
    let dir = std::env::var_os("VOUCH_UAPI_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("VOUCH_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/vouch")
        });
        cache.join("linux-uapi-6.12")
    });
    let header = dir.join("usr/include/linux/psp-sev.h");
    let text = std::fs::read_to_string(&header).unwrap_or_default();
    assert!(
        text.contains("SNP_PLATFORM_STATUS"),
        "{} missing or older than 6.12: run scripts/setup-host.sh (it unpacks linux-libc-dev 6.12 there)",
        header.display()
    );
    dir
}

const BITS: [&str; 4] = ["is_rmp_initialized", "mask_chip_id", "mask_chip_key", "vlek_en"];

/// The C program: one `name value` line per layout entry, then one `bits:<field> <hex>` line per
/// bit field of the SNP status with only that field set.
fn c_program(names: &[&str]) -> String {
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <string.h>\n#include <linux/ioctl.h>\n\
         #include <linux/psp-sev.h>\n#include <linux/sev-guest.h>\nint main(void) {\n",
    );
    for n in names {
        c.push_str(&format!("  printf(\"%s=%lu\\n\", \"{n}\", (unsigned long)({n}));\n"));
    }
    for b in BITS {
        c.push_str(&format!(
            "  {{ struct sev_user_data_snp_status s; unsigned char *p = (unsigned char *)&s;\n    \
             memset(&s, 0, sizeof s); s.{b} = 1; printf(\"bits:{b}=\");\n    \
             for (size_t i = 0; i < sizeof s; i++) printf(\"%02x\", p[i]); printf(\"\\n\"); }}\n"
        ));
    }
    c.push_str("  return 0;\n}\n");
    c
}

fn kernel_values(names: &[&str]) -> BTreeMap<String, String> {
    let include = uapi().join("usr/include");
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("abi.c");
    std::fs::write(&src, c_program(names)).unwrap();
    let exe = t.path().join("abi");
    let out = Command::new("cc")
        .arg("-I")
        .arg(&include)
        .arg("-I")
        .arg(include.join("x86_64-linux-gnu"))
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("cc (gcc) is needed: apt-get install gcc");
    assert!(
        out.status.success(),
        "compiling against {}:\n{}",
        include.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

#[test]
fn ioctl_structs_match_linux_6_12_headers() {
    let ours: Vec<(&str, usize)> =
        agent::sev_guest::LAYOUT.iter().chain(host_launcher::snp::sys::LAYOUT).copied().collect();
    let names: Vec<&str> = ours.iter().map(|(n, _)| *n).collect();
    let kernel = kernel_values(&names);
    let wrong: Vec<String> = ours
        .iter()
        .filter(|(n, v)| kernel.get(*n) != Some(&v.to_string()))
        .map(|(n, v)| format!("{n}: ours {v}, kernel {:?}", kernel.get(*n)))
        .collect();
    assert!(wrong.is_empty(), "layout differs from the kernel's:\n{}", wrong.join("\n"));
    assert!(ours.len() >= 28, "every struct of both sides is compared");

    // Each bit field, set alone in C, decodes as exactly that flag.
    for b in BITS {
        let hex = &kernel[&format!("bits:{b}")];
        let raw: [u8; 32] = hex::decode(hex).unwrap().try_into().unwrap();
        let s = PlatformStatus::decode(&raw);
        let got = [s.is_rmp_initialized, s.mask_chip_id, s.mask_chip_key, s.vlek_en];
        let want = BITS.map(|x| x == b);
        assert_eq!(got, want, "{b} set in C: {hex}");
    }
}

#[test]
fn configfs_tsm_use_matches_the_abi_document() {
    let abi = uapi().join("abi");
    let read = |rel: &str| {
        std::fs::read_to_string(abi.join(rel))
            .unwrap_or_else(|e| panic!("{}/{rel}: {e} (run scripts/setup-host.sh)", abi.display()))
    };
    let doc = read("Documentation/ABI/testing/configfs-tsm");
    for attr in [agent::attest::TSM_INBLOB, agent::attest::TSM_OUTBLOB, agent::attest::TSM_AUXBLOB]
    {
        let what = format!("What:\t\t{}/$name/{attr}", agent::attest::TSM_REPORT_DIR);
        assert!(doc.contains(&what), "the ABI document has no `{what}`");
    }
    // auxblob of the sev_guest provider is the GHCB cert_table our parser reads.
    assert!(doc.contains("\"cert_table\" from SEV-ES Guest-Hypervisor Communication Block"));
    let define = |text: &str, name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix("#define ").and_then(|r| r.strip_prefix(name)))
            .unwrap_or_else(|| panic!("no #define {name}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    // inblob takes at most 64 bytes: exactly REPORT_DATA.
    assert_eq!(define(&read("include/linux/tsm.h"), "TSM_INBLOB_MAX"), "64");
    // The largest certificate buffer the guest driver accepts.
    let blob = define(&read("include/linux/psp-sev.h"), "SEV_FW_BLOB_MAX_SIZE");
    assert_eq!(
        usize::from_str_radix(blob.trim_start_matches("0x"), 16).unwrap(),
        agent::sev_guest::CERTS_MAX
    );
}

fn snp_spec(dir: &Path) -> QemuSpec {
    for f in ["bzImage", "initrd", "OVMF.amdsev.fd"] {
        std::fs::write(dir.join(f), vec![0u8; 4096]).unwrap();
    }
    QemuSpec {
        mode: Mode::Snp,
        kernel: dir.join("bzImage"),
        initrd: dir.join("initrd"),
        cmdline: "console=ttyS0".into(),
        memory_mib: 256,
        vcpus: 1,
        vsock: VsockDevice::User { socket: dir.join("vsock.sock") },
        snp: Some(SnpLaunch {
            ovmf: dir.join("OVMF.amdsev.fd"),
            host_data: [7; 32],
            policy: SNP_POLICY,
            cbitpos: 51,
            reduced_phys_bits: 1,
            cpu_model: "EPYC-v4".into(),
        }),
        network: None,
    }
}

/// Properties QEMU's `help` does not list because they are per-instance properties of
/// `sev-snp-guest`; the launch below checks that QEMU takes them.
const INSTANCE_PROPS: [&str; 2] = ["cbitpos", "reduced-phys-bits"];

#[test]
fn the_snp_command_line_is_what_qemu_accepts() {
    let qemu = std::env::var("VOUCH_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let t = tempfile::tempdir().unwrap();
    let mut argv = qemu_argv(&snp_spec(t.path())).unwrap();

    // Every property of every -machine, -object and -device is in QEMU's own list for its type.
    let mut checked = 0;
    for (i, opt) in argv.iter().enumerate() {
        if !matches!(opt.as_str(), "-machine" | "-object" | "-device") {
            continue;
        }
        let mut parts = argv[i + 1].split(',');
        let ty = parts.next().unwrap();
        let help =
            Command::new(&qemu).args([opt.as_str(), &format!("{ty},help")]).output().expect("QEMU");
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        for key in parts.map(|p| p.split('=').next().unwrap()).filter(|k| *k != "id") {
            let listed = help.lines().any(|l| l.trim_start().starts_with(&format!("{key}=")));
            let instance = ty == "sev-snp-guest" && INSTANCE_PROPS.contains(&key);
            assert!(listed || instance, "{opt} {ty}: QEMU does not list property {key}:\n{help}");
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} properties checked");

    // The whole command line parses: with TCG instead of KVM, QEMU creates every object and
    // stops only where SNP needs KVM. A misspelt property stops it earlier with "not found".
    let accel = argv.iter().position(|a| a == "kvm").unwrap();
    argv[accel] = "tcg".into();
    let cpu = argv.iter().position(|a| a == "EPYC-v4").unwrap();
    argv[cpu] = "qemu64".into();
    // The vhost-user chardev connects at startup: something must listen.
    let _vsock = std::os::unix::net::UnixListener::bind(t.path().join("vsock.sock")).unwrap();
    let run = |argv: &[String]| {
        let out = Command::new("timeout").arg("20").arg(&qemu).args(argv).output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&argv);
    assert!(
        err.contains("sev-snp-guest: KVM required"),
        "QEMU refused our SNP command line earlier:\n{err}"
    );
    for (from, to) in [("kernel-hashes=on", "kernel-hash=on"), ("cbitpos=", "cbitpo=")] {
        let bad: Vec<String> = argv.iter().map(|a| a.replace(from, to)).collect();
        let err = run(&bad);
        assert!(!err.contains("KVM required") && err.contains("sev-snp-guest"), "{to}: {err}");
    }
}
