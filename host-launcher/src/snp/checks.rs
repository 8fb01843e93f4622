//! The host checks behind `vouch doctor` and the SNP preflight: one [`Check`] per line, each
//! failing one with the fix that makes it pass.
//!
//! Algorithm: [`Facts::probe`] reads what the host offers (sysfs, `/dev/kvm`, `/dev/sev`'s
//! `SNP_PLATFORM_STATUS` and `SEV_GET_ID2`, QEMU's object list, the image manifest, the vsock
//! backend, the certificate cache); [`evaluate`] turns those facts into checks, as a pure
//! function (unit-tested on made-up hosts). [`preflight`] runs the SNP checks before an SNP VM
//! starts and refuses with every failing check and its fix: it reads a few sysfs files, issues
//! two read-only ioctls and runs `qemu -object help` once (well under a second), whereas a VM
//! that runs without them fails only after the whole build.
//!
//! What is not here: fetching certificates ([`super::kds`]), printing ([`crate`]'s CLI).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use serde::Serialize;
use vm_image::image::Manifest;

use super::certs::{check_vcek, CertCache};
use super::platform::{tcb_below, HostIdentity, Platform};
use crate::vm::vsock::find_daemon;
use crate::vm::HostCaps;

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Passes.
    Ok,
    /// Works, but look at it.
    Warn,
    /// Fails.
    Fail,
}

/// What a check is needed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Needed {
    /// Every build.
    Build,
    /// SEV-SNP builds.
    Snp,
}

/// One line of `vouch doctor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short name.
    pub name: &'static str,
    /// Verdict.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do (for `warn` and `fail`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// What it is needed for.
    pub needed: Needed,
}

/// The VCEK the launcher would use, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcekFact {
    /// Found at this path and it matches the host.
    Found(PathBuf),
    /// Found but refused.
    Bad(PathBuf, String),
    /// Not found; where it was looked for.
    Missing(PathBuf),
    /// The host's identity is unknown (no `/dev/sev`, unknown CPU, masked chip ID).
    NoIdentity,
}

/// Everything the checks look at.
#[derive(Debug, Clone)]
pub struct Facts {
    /// `/dev/kvm`, CPU flags, `sev_snp`, `/dev/sev`, `/dev/vhost-vsock`.
    pub caps: HostCaps,
    /// `/sys/module/kvm_amd/parameters/sev_snp`.
    pub sev_snp_param: Option<String>,
    /// `/dev/sev`'s answers.
    pub platform: Result<Platform, String>,
    /// `qemu --version` first line.
    pub qemu: Result<String, String>,
    /// QEMU lists `sev-snp-guest`.
    pub qemu_snp_object: bool,
    /// The image directory and its manifest (files checked).
    pub image: (PathBuf, Result<Manifest, String>),
    /// The userspace vsock daemon.
    pub vsock_daemon: Option<PathBuf>,
    /// The VCEK for the reported TCB.
    pub vcek: VcekFact,
}

/// Inputs of [`Facts::probe`].
#[derive(Debug, Clone)]
pub struct ProbeConfig<'a> {
    /// QEMU binary.
    pub qemu: &'a Path,
    /// Image directory.
    pub image_dir: &'a Path,
    /// State directory (certificate cache).
    pub state_dir: &'a Path,
    /// An explicitly configured VCEK (`--snp-vcek`).
    pub vcek: Option<&'a Path>,
    /// The image's manifest when the caller already loaded and verified it.
    pub manifest: Option<&'a Manifest>,
}

/// Find the VCEK for `identity`: the configured file, else the cache.
pub fn find_vcek(
    identity: Option<&HostIdentity>,
    state_dir: &Path,
    configured: Option<&Path>,
) -> VcekFact {
    let Some(id) = identity else { return VcekFact::NoIdentity };
    let (path, bytes) = match configured {
        Some(p) => (p.to_owned(), std::fs::read(p)),
        None => {
            let p = CertCache::new(state_dir).vcek_file(id);
            match std::fs::read(&p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return VcekFact::Missing(p),
                r => (p, r),
            }
        }
    };
    let der = match bytes.map(|b| build_trace::evidence::certs::load_certificates(&b)) {
        Ok(Ok(mut certs)) if !certs.is_empty() => certs.remove(0),
        Ok(_) => return VcekFact::Bad(path, "no certificate in the file".into()),
        Err(e) => return VcekFact::Bad(path, e.to_string()),
    };
    match check_vcek(&der, Some(id), SystemTime::now()) {
        Ok(_) => VcekFact::Found(path),
        Err(e) => VcekFact::Bad(path, build_trace::error_chain(&e)),
    }
}

impl Facts {
    /// Probe this host.
    pub fn probe(cfg: &ProbeConfig<'_>) -> Facts {
        let caps = HostCaps::probe();
        let sev_snp_param = std::fs::read_to_string("/sys/module/kvm_amd/parameters/sev_snp")
            .ok()
            .map(|s| s.trim().to_owned());
        let platform =
            if caps.dev_sev { Platform::probe() } else { Err("/dev/sev is missing".into()) };
        let qemu = Command::new(cfg.qemu)
            .arg("--version")
            .output()
            .map_err(|e| format!("{}: {e}", cfg.qemu.display()))
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{} --version printed nothing", cfg.qemu.display()))
            });
        let qemu_snp_object =
            Command::new(cfg.qemu).args(["-object", "help"]).output().is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == "sev-snp-guest")
            });
        let manifest = match cfg.manifest {
            Some(m) => Ok(m.clone()),
            None => Manifest::load(cfg.image_dir)
                .and_then(|m| m.verify_files(cfg.image_dir).map(|()| m))
                .map_err(|e| e.to_string()),
        };
        let identity = platform.as_ref().ok().and_then(Platform::identity);
        let vcek = find_vcek(identity.as_ref(), cfg.state_dir, cfg.vcek);
        Facts {
            caps,
            sev_snp_param,
            platform,
            qemu,
            qemu_snp_object,
            image: (cfg.image_dir.to_owned(), manifest),
            vsock_daemon: find_daemon(),
            vcek,
        }
    }
}

fn check(name: &'static str, needed: Needed, ok: bool, detail: String, fix: &str) -> Check {
    Check {
        name,
        status: if ok { Status::Ok } else { Status::Fail },
        detail,
        fix: (!ok).then(|| fix.to_owned()),
        needed,
    }
}

const FIX_BIOS: &str = "enable SEV-SNP in the BIOS (SMEE on, SEV-SNP support on, SNP memory \
    coverage / RMP table on, IOMMU on), boot a host kernel >= 6.11 with kvm_amd.sev_snp=1 and \
    load the ccp module; see docs/snp-host.md section 1";
const FIX_SET_CONFIG: &str = "clear it with SNP_SET_CONFIG (e.g. `snphost config set` with \
    mask_chip_id=0 mask_chip_key=0) or reboot: the firmware default is 0";

fn platform_checks(f: &Facts, out: &mut Vec<Check>) {
    let snp = Needed::Snp;
    let p = match &f.platform {
        Ok(p) => p,
        Err(e) => {
            let fix =
                "make /dev/sev answer first (see /dev/sev); as root, or with read access to it";
            out.push(check("snp-firmware", snp, false, format!("SNP_PLATFORM_STATUS: {e}"), fix));
            return;
        }
    };
    let s = &p.status;
    let product = p.product.map(|p| p.name()).unwrap_or("unknown product");
    let tcb = |raw: [u8; 8]| match p.product {
        Some(pr) => build_trace::evidence::TcbVersion::decode(raw, pr.tcb_layout()).to_string(),
        None => hex::encode(raw),
    };
    out.push(check(
        "snp-firmware",
        snp,
        p.product.is_some(),
        format!(
            "{product}, SNP firmware {}, state {}, current TCB {}, reported TCB {}",
            s.firmware(),
            if s.state == 1 { "INIT" } else { "UNINIT" },
            tcb(s.current_tcb),
            tcb(s.reported_tcb)
        ),
        "this CPU is not a Milan, Genoa or Turin EPYC that vouch knows",
    ));
    out.push(check(
        "rmp",
        snp,
        s.is_rmp_initialized,
        format!("is_rmp_initialized = {}", u8::from(s.is_rmp_initialized)),
        "SNP_INIT did not run: load kvm_amd with sev_snp=1 (it initialises SNP) and read \
         `dmesg | grep -i sev` for the firmware's complaint",
    ));
    out.push(check(
        "mask-chip-key",
        snp,
        !s.mask_chip_key,
        format!("mask_chip_key = {} (1: reports are not signed)", u8::from(s.mask_chip_key)),
        FIX_SET_CONFIG,
    ));
    out.push(check(
        "mask-chip-id",
        snp,
        !s.mask_chip_id,
        format!(
            "mask_chip_id = {} (1: CHIP_ID is zero, no VCEK can be named)",
            u8::from(s.mask_chip_id)
        ),
        FIX_SET_CONFIG,
    ));
    out.push(check(
        "vlek",
        snp,
        !s.vlek_en,
        format!("VLEK loaded: {}", if s.vlek_en { "yes" } else { "no (reports are VCEK-signed)" }),
        "a loaded VLEK signs reports instead of the VCEK, and the default genuine-AMD policy \
         accepts VCEK-signed reports only; reboot without SNP_VLEK_LOAD",
    ));
    if let (Some(cur), Some(id)) = (p.current_tcb(), p.identity()) {
        if tcb_below(&id.tcb, &cur) {
            out.push(Check {
                name: "reported-tcb",
                status: Status::Warn,
                detail: format!("reported TCB {} is below the installed {cur}", id.tcb),
                fix: Some(
                    "the host holds the reported TCB back (SNP_SET_CONFIG); reports and the VCEK \
                     use the reported one. Raise it with SNP_COMMIT once guests may rely on the \
                     new firmware, then `vouch snp certs fetch` again"
                        .into(),
                ),
                needed: snp,
            });
        }
    }
}

fn vcek_check(f: &Facts) -> Check {
    let snp = Needed::Snp;
    match &f.vcek {
        VcekFact::Found(p) => check(
            "vcek",
            snp,
            true,
            format!("{} matches the chip and reported TCB", p.display()),
            "",
        ),
        VcekFact::Missing(p) => check(
            "vcek",
            snp,
            false,
            format!("no VCEK for the reported TCB ({} is missing)", p.display()),
            "run `vouch snp certs fetch` (offline: `vouch snp certs fetch --from DIR` with the \
             VCEK from https://kdsintf.amd.com/vcek/v1/<product>/<hwID>?<SPLs>)",
        ),
        VcekFact::Bad(p, why) => check(
            "vcek",
            snp,
            false,
            format!("{}: {why}", p.display()),
            "fetch the VCEK for this chip and reported TCB: `vouch snp certs fetch`",
        ),
        VcekFact::NoIdentity => check(
            "vcek",
            snp,
            false,
            "cannot name this host's VCEK (no /dev/sev platform status or chip ID)".into(),
            "make snp-firmware pass first, or name the chip with `vouch snp certs fetch --report`",
        ),
    }
}

fn image_checks(f: &Facts, out: &mut Vec<Check>) {
    let (dir, m) = &f.image;
    match m {
        Ok(m) => {
            out.push(check(
                "image",
                Needed::Build,
                true,
                format!(
                    "{} ({}; simulated measurement {}…)",
                    dir.display(),
                    m.agent_version,
                    &m.simulated_measurement[..16.min(m.simulated_measurement.len())]
                ),
                "",
            ));
            out.push(match &m.snp {
                Some(s) => check(
                    "ovmf",
                    Needed::Snp,
                    true,
                    format!(
                        "AmdSev OVMF sha256 {}; expected SNP measurement {}",
                        s.ovmf.sha256, s.expected_measurement
                    ),
                    "",
                ),
                None => check(
                    "ovmf",
                    Needed::Snp,
                    false,
                    "the image was built without an AmdSev OVMF: no expected SNP measurement"
                        .into(),
                    "build one with scripts/build-ovmf-amdsev.sh, then `vouch image build --ovmf \
                     <OVMF.amdsev.fd>` (docs/snp-host.md section 3)",
                ),
            });
        }
        Err(e) => out.push(check(
            "image",
            Needed::Build,
            false,
            format!("{}: {e}", dir.display()),
            "run scripts/build-image.sh (or `vouch image build`), or point --image / \
             $VOUCH_IMAGE_DIR at a built image",
        )),
    }
}

/// The checks of `facts`, in display order.
pub fn evaluate(f: &Facts) -> Vec<Check> {
    let mut out = Vec::new();
    let c = &f.caps;
    out.push(check(
        "kvm",
        Needed::Snp,
        c.kvm_usable(),
        format!("/dev/kvm writable: {}; svm/vmx in /proc/cpuinfo: {}", c.kvm_dev, c.hw_virt),
        "enable SVM in the BIOS and load kvm_amd; without KVM builds run under TCG (slow, simulated evidence)",
    ));
    out.push(check(
        "kvm_amd-sev_snp",
        Needed::Snp,
        c.kvm_snp,
        format!(
            "/sys/module/kvm_amd/parameters/sev_snp = {}",
            f.sev_snp_param.as_deref().unwrap_or("(missing)")
        ),
        FIX_BIOS,
    ));
    out.push(check(
        "/dev/sev",
        Needed::Snp,
        c.dev_sev,
        format!("present: {}", c.dev_sev),
        "`modprobe ccp` once SEV-SNP is on in the BIOS (see kvm_amd-sev_snp)",
    ));
    platform_checks(f, &mut out);
    out.push(vcek_check(f));
    out.push(match &f.qemu {
        Ok(v) => check("qemu", Needed::Build, true, v.clone(), ""),
        Err(e) => check(
            "qemu",
            Needed::Build,
            false,
            e.clone(),
            "install QEMU >= 9.1 (scripts/setup-host.sh), or pass --qemu",
        ),
    });
    out.push(check(
        "sev-snp-guest",
        Needed::Snp,
        f.qemu_snp_object,
        format!("QEMU object sev-snp-guest available: {}", f.qemu_snp_object),
        "install QEMU >= 9.1 (Debian: bookworm-backports' qemu-system-x86)",
    ));
    image_checks(f, &mut out);
    let vsock_ok = c.vhost_vsock || f.vsock_daemon.is_some();
    out.push(check(
        "vsock",
        Needed::Build,
        vsock_ok,
        match (&c.vhost_vsock, &f.vsock_daemon) {
            (true, _) => "kernel vhost-vsock (/dev/vhost-vsock)".into(),
            (false, Some(d)) => format!("userspace vhost-device-vsock at {}", d.display()),
            (false, None) => "no /dev/vhost-vsock and no vhost-device-vsock".into(),
        },
        "modprobe vhost_vsock, or install vhost-device-vsock (scripts/setup-host.sh)",
    ));
    out
}

/// Why an SNP VM was not started.
#[derive(Debug, thiserror::Error)]
#[error("SEV-SNP preflight failed, no VM was started:{}", list(.0))]
pub struct PreflightError(pub Vec<Check>);

fn list(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| format!("\n  {}: {} (fix: {})", c.name, c.detail, c.fix.as_deref().unwrap_or("-")))
        .collect()
}

/// The failing checks of `facts` that an SNP build needs (warnings pass).
pub fn snp_failures(f: &Facts) -> Vec<Check> {
    evaluate(f).into_iter().filter(|c| c.status == Status::Fail).collect()
}

/// Refuse to start an SNP VM while any check fails (see the module doc).
pub fn preflight(cfg: &ProbeConfig<'_>) -> Result<(), PreflightError> {
    let failing = snp_failures(&Facts::probe(cfg));
    if failing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError(failing))
    }
}

#[cfg(test)]
mod tests;
