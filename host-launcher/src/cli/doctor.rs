//! `vouch doctor`: what this host can do, one line per check, and the mode `vouch build` would
//! pick. Exit 0 when builds can run at all (QEMU, a vsock backend and an image), 1 otherwise.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use host_launcher::vm::vsock::find_daemon;
use host_launcher::vm::{choose_mode, HostCaps, Mode};
use vm_image::image::Manifest;

use super::{CmdResult, Global};

/// Arguments of `vouch doctor`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image directory (default: $VOUCH_IMAGE_DIR, else $VOUCH_CACHE/image).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Also check this OVMF for the AmdSev kernel-hashes section.
    #[arg(long)]
    pub ovmf: Option<PathBuf>,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
}

fn line(ok: bool, what: &str, detail: &str) {
    println!("{} {what:<14} {detail}", if ok { "[ok]  " } else { "[no]  " });
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

const OVMF_CANDIDATES: &[&str] = &[
    "/usr/share/ovmf/OVMF.amdsev.fd",
    "/usr/share/OVMF/OVMF.amdsev.fd",
    "/usr/share/edk2/ovmf/OVMF.amdsev.fd",
];

/// Run `vouch doctor`.
pub fn run(args: Args, _global: &Global) -> CmdResult {
    let caps = HostCaps::probe();
    line(
        caps.kvm_usable(),
        "kvm",
        &format!(
            "/dev/kvm writable: {}; svm/vmx in /proc/cpuinfo: {}{}",
            yes(caps.kvm_dev),
            yes(caps.hw_virt),
            if caps.kvm_dev && !caps.hw_virt {
                " (a paravirtual /dev/kvm that cannot run normal guests: TCG only)"
            } else {
                ""
            }
        ),
    );
    let snp_param = std::fs::read_to_string("/sys/module/kvm_amd/parameters/sev_snp")
        .map(|s| s.trim().to_owned());
    line(
        caps.kvm_snp,
        "snp-in-kvm",
        &format!(
            "/sys/module/kvm_amd/parameters/sev_snp: {}",
            snp_param.as_deref().unwrap_or("missing")
        ),
    );
    line(caps.dev_sev, "/dev/sev", if caps.dev_sev { "present" } else { "missing" });

    let qemu_version =
        Command::new(&args.qemu).arg("--version").output().ok().filter(|o| o.status.success());
    let qemu_ok = qemu_version.is_some();
    let version = qemu_version
        .as_ref()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned))
        .unwrap_or_else(|| format!("{} not found", args.qemu.display()));
    line(qemu_ok, "qemu", &version);
    let objects = Command::new(&args.qemu).args(["-object", "help"]).output().ok();
    let has_snp_object =
        objects.is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains("sev-snp-guest"));
    line(
        has_snp_object,
        "sev-snp-guest",
        &format!("QEMU object available: {}", yes(has_snp_object)),
    );

    let image_dir = args.image.clone().unwrap_or_else(vm_image::default_image_dir);
    let manifest = Manifest::load(&image_dir);
    let image_ok = match &manifest {
        Ok(m) => match m.verify_files(&image_dir) {
            Ok(()) => {
                line(
                    true,
                    "image",
                    &format!(
                        "{} ({}, files match the manifest)",
                        image_dir.display(),
                        m.agent_version
                    ),
                );
                true
            }
            Err(e) => {
                line(false, "image", &format!("{}: {e}", image_dir.display()));
                false
            }
        },
        Err(e) => {
            line(
                false,
                "image",
                &format!("{}: {e} (run scripts/build-image.sh)", image_dir.display()),
            );
            false
        }
    };
    let image_snp = manifest.as_ref().ok().and_then(|m| m.snp.as_ref());
    let mut ovmf_files: Vec<PathBuf> = args.ovmf.iter().cloned().collect();
    ovmf_files.extend(OVMF_CANDIDATES.iter().map(PathBuf::from).filter(|p| p.exists()));
    match (image_snp, ovmf_files.first()) {
        (Some(s), _) => line(true, "ovmf", &format!("image carries an AmdSev OVMF (sha256 {}), expected measurement {}", s.ovmf.sha256, s.expected_measurement)),
        (None, Some(f)) => {
            let ok = vm_image::measure::ovmf_supports_kernel_hashes(f).unwrap_or(false);
            line(ok, "ovmf", &format!("{}: kernel-hashes section: {} (image built without it: rebuild with VOUCH_OVMF={})", f.display(), yes(ok), f.display()));
        }
        (None, None) => line(false, "ovmf", "no AmdSev OVMF found (Debian bookworm ships none; measured direct boot needs OvmfPkg/AmdSev)"),
    }

    let daemon = find_daemon();
    let vsock_ok = caps.vhost_vsock || daemon.is_some();
    let detail = match (&caps.vhost_vsock, &daemon) {
        (true, _) => "kernel vhost-vsock (/dev/vhost-vsock)".to_owned(),
        (false, Some(d)) => {
            format!("/dev/vhost-vsock missing; userspace vhost-device-vsock at {}", d.display())
        }
        (false, None) => {
            "/dev/vhost-vsock missing and no vhost-device-vsock (run scripts/setup-host.sh)"
                .to_owned()
        }
    };
    line(vsock_ok, "vsock", &detail);

    let mode = choose_mode(None, &caps, image_snp.is_some()).unwrap_or(Mode::Tcg);
    let evidence = if mode == Mode::Snp { "sev-snp" } else { "simulated (no SEV-SNP here)" };
    let can_build = qemu_ok && vsock_ok && image_ok;
    line(can_build, "mode", &format!("`vouch build` would run {mode}; evidence: {evidence}"));
    Ok(if can_build { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
