//! Running one build VM with QEMU.
//!
//! What is here: the three [`Mode`]s (`snp`, `kvm`, `tcg`), what this host can do
//! ([`HostCaps::probe`]) and the automatic choice ([`choose_mode`]); the QEMU command line as a
//! pure function of a [`QemuSpec`] ([`qemu_argv`], unit-tested per mode); the process runner
//! ([`runner`]), the vsock host side ([`vsock`]), and how both die with the launcher
//! ([`child`]).
//!
//! Rules: KVM only when `/dev/kvm` is writable **and** `/proc/cpuinfo` shows `svm` or `vmx`
//! (our CI's `/dev/kvm` is a paravirtual nested backend that opens but cannot run a normal
//! guest); SNP only when KVM is usable, `kvm_amd`'s `sev_snp` is `Y`, `/dev/sev` exists and the
//! image was built with an AmdSev OVMF. Always `-nic none` unless the step is the networked
//! fixed-output variant, whose QEMU runs in a filtered network namespace of its own
//! ([`egress`]); machine `q35` (microvm hangs under TCG, SNP needs q35).
//!
//! What is not here: the channel protocol (see `crate::build`).

pub mod child;
pub mod egress;
pub mod network;
pub mod runner;
pub mod vsock;

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;

/// How the VM runs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// SEV-SNP confidential VM under KVM: real attestation.
    Snp,
    /// Plain KVM (no SNP): simulated evidence.
    Kvm,
    /// QEMU's emulator (no KVM): simulated evidence, slow.
    Tcg,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Snp => "snp",
            Mode::Kvm => "kvm",
            Mode::Tcg => "tcg",
        })
    }
}

/// What the host offers, as probed from `/dev`, `/proc` and `/sys`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCaps {
    /// `/dev/kvm` exists and is writable.
    pub kvm_dev: bool,
    /// `/proc/cpuinfo` has `svm` or `vmx`.
    pub hw_virt: bool,
    /// `/sys/module/kvm_amd/parameters/sev_snp` is `Y`.
    pub kvm_snp: bool,
    /// `/dev/sev` exists.
    pub dev_sev: bool,
    /// `/dev/vhost-vsock` exists and is writable.
    pub vhost_vsock: bool,
}

fn writable(path: &str) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Whether a `/proc/cpuinfo` text shows hardware virtualisation (`svm` or `vmx` flags).
pub fn cpuinfo_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "svm" || f == "vmx"))
}

impl HostCaps {
    /// Probe this host.
    pub fn probe() -> HostCaps {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostCaps {
            kvm_dev: writable("/dev/kvm"),
            hw_virt: cpuinfo_has_hw_virt(&cpuinfo),
            kvm_snp: std::fs::read_to_string("/sys/module/kvm_amd/parameters/sev_snp")
                .map(|s| s.trim() == "Y" || s.trim() == "1")
                .unwrap_or(false),
            dev_sev: Path::new("/dev/sev").exists(),
            vhost_vsock: writable("/dev/vhost-vsock"),
        }
    }

    /// KVM can run a normal guest here.
    pub fn kvm_usable(&self) -> bool {
        self.kvm_dev && self.hw_virt
    }

    /// The host can launch SEV-SNP guests.
    pub fn snp_usable(&self) -> bool {
        self.kvm_usable() && self.kvm_snp && self.dev_sev
    }
}

/// Errors choosing a mode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModeError {
    /// `--mode snp` where the host cannot.
    #[error("--mode snp: this host cannot launch SEV-SNP guests ({0}); see `vouch doctor`")]
    NoSnp(&'static str),
    /// `--mode kvm` where KVM is not usable.
    #[error("--mode kvm: KVM is not usable here (/dev/kvm writable: {kvm_dev}, svm/vmx in /proc/cpuinfo: {hw_virt}); use --mode tcg")]
    NoKvm {
        /// `/dev/kvm` writable.
        kvm_dev: bool,
        /// CPU flags.
        hw_virt: bool,
    },
}

/// The mode to run in: `requested` if given and possible, else the best the host and image
/// allow (snp > kvm > tcg). `image_has_snp`: the image carries an AmdSev OVMF + measurement.
pub fn choose_mode(
    requested: Option<Mode>,
    caps: &HostCaps,
    image_has_snp: bool,
) -> Result<Mode, ModeError> {
    match requested {
        Some(Mode::Snp) => {
            if !caps.snp_usable() {
                let why = if !caps.kvm_usable() {
                    "KVM is not usable"
                } else if !caps.kvm_snp {
                    "kvm_amd sev_snp is not enabled"
                } else {
                    "/dev/sev is missing"
                };
                return Err(ModeError::NoSnp(why));
            }
            if !image_has_snp {
                return Err(ModeError::NoSnp(
                    "the image was built without an AmdSev OVMF (vouch image build --ovmf)",
                ));
            }
            Ok(Mode::Snp)
        }
        Some(Mode::Kvm) if !caps.kvm_usable() => {
            Err(ModeError::NoKvm { kvm_dev: caps.kvm_dev, hw_virt: caps.hw_virt })
        }
        Some(m) => Ok(m),
        None if caps.snp_usable() && image_has_snp => Ok(Mode::Snp),
        None if caps.kvm_usable() => Ok(Mode::Kvm),
        None => Ok(Mode::Tcg),
    }
}

/// The vsock device of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockDevice {
    /// Kernel `vhost-vsock-pci` with this guest CID.
    Kernel {
        /// Guest CID (unique on the host).
        cid: u32,
    },
    /// `vhost-user-vsock-pci` connected to a `vhost-device-vsock` daemon's control socket.
    User {
        /// The daemon's `--socket`.
        socket: PathBuf,
    },
}

/// SEV-SNP launch settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnpLaunch {
    /// The AmdSev OVMF (`-bios`).
    pub ovmf: PathBuf,
    /// HOST_DATA (32 bytes, base64 on the command line).
    pub host_data: [u8; 32],
    /// Guest policy; never with the DEBUG bit (19).
    pub policy: u64,
    /// C-bit position (host CPUID 0x8000001F EBX\[5:0\]).
    pub cbitpos: u32,
    /// Reduced physical address bits.
    pub reduced_phys_bits: u32,
    /// `-cpu` model, which the measurement depends on.
    pub cpu_model: String,
}

/// The CPU model of TCG guests (see [`qemu_argv`]).
pub const TCG_CPU: &str = "qemu64,+rdrand,+ssse3,+sse4.1,+sha-ni";

/// Default SNP guest policy: SMT allowed (bit 16), reserved bit 17; debug and migration off.
pub const SNP_POLICY: u64 = 0x30000;

/// Everything the QEMU command line depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSpec {
    /// Mode.
    pub mode: Mode,
    /// Kernel: `vmlinux` for kvm/tcg (PVH), `bzImage` for snp (through OVMF).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Kernel command line (the image's, fixed).
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// vsock device.
    pub vsock: VsockDevice,
    /// SNP settings; required in snp mode, ignored otherwise.
    pub snp: Option<SnpLaunch>,
    /// User-mode networking: only with a grant, which only a fixed-output job gets
    /// ([`network::NetworkGrant::for_job`]); `None` gives `-nic none`.
    pub network: Option<network::NetworkGrant>,
}

/// Errors building the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgvError {
    /// snp mode without SNP settings.
    #[error("snp mode needs an AmdSev OVMF and HOST_DATA")]
    MissingSnp,
    /// A policy with the DEBUG bit.
    #[error("refusing SNP policy {0:#x}: the DEBUG bit (19) lets the host read guest memory")]
    DebugPolicy(u64),
}

/// Escape a value for QEMU's `key=value,...` option syntax (commas are doubled).
pub fn qemu_escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// The QEMU arguments (without the program name) for `spec`.
pub fn qemu_argv(spec: &QemuSpec) -> Result<Vec<String>, ArgvError> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let mem = format!("{}M", spec.memory_mib);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
    let iommu = spec.mode == Mode::Snp;
    match spec.mode {
        Mode::Snp => {
            let snp = spec.snp.as_ref().ok_or(ArgvError::MissingSnp)?;
            if snp.policy & (1 << 19) != 0 {
                return Err(ArgvError::DebugPolicy(snp.policy));
            }
            let host_data = base64::engine::general_purpose::STANDARD.encode(snp.host_data);
            push(&["-accel", "kvm", "-cpu", &snp.cpu_model]);
            push(&[
                "-machine",
                "q35,confidential-guest-support=sev0,memory-backend=mem,vmport=off",
            ]);
            push(&[
                "-object",
                &format!(
                    "sev-snp-guest,id=sev0,cbitpos={},reduced-phys-bits={},kernel-hashes=on,policy={:#x},host-data={host_data}",
                    snp.cbitpos, snp.reduced_phys_bits, snp.policy
                ),
            ]);
            push(&["-bios", &snp.ovmf.to_string_lossy()]);
        }
        Mode::Kvm => push(&["-accel", "kvm", "-cpu", "host", "-machine", "q35,memory-backend=mem"]),
        // QEMU's default model, the fastest one under TCG, plus: RDRAND, so the guest kernel
        // seeds its RNG at once (without it getrandom() blocks for about a second under TCG),
        // and the SHA extensions with the SSSE3/SSE4.1 that sha2's SHA-NI code needs: TCG
        // emulates them with native helpers, which hashes inputs and outputs about twice as fast
        // as emulating the scalar code (measured with QEMU 10.0: `docs/benchmarks.md`).
        Mode::Tcg => {
            push(&["-accel", "tcg", "-cpu", TCG_CPU, "-machine", "q35,memory-backend=mem"])
        }
    }
    push(&["-smp", &spec.vcpus.to_string(), "-m", &mem]);
    push(&["-object", &format!("memory-backend-memfd,id=mem,size={mem},share=on")]);
    push(&["-kernel", &spec.kernel.to_string_lossy()]);
    push(&["-initrd", &spec.initrd.to_string_lossy()]);
    push(&["-append", &spec.cmdline]);
    push(&["-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con"]);
    let virtio_extra = if iommu { ",iommu_platform=on,disable-legacy=on" } else { "" };
    match &spec.vsock {
        VsockDevice::Kernel { cid } => {
            push(&["-device", &format!("vhost-vsock-pci,guest-cid={cid}{virtio_extra}")]);
        }
        VsockDevice::User { socket } => {
            push(&["-chardev", &format!("socket,id=vsock,path={}", qemu_escape(socket))]);
            push(&["-device", &format!("vhost-user-vsock-pci,chardev=vsock{virtio_extra}")]);
        }
    }
    if spec.network.is_some() {
        // The fixed-output variant: user-mode networking and nothing else changed.
        push(&[
            "-netdev",
            network::USER_NETDEV,
            "-device",
            &format!("virtio-net-pci,netdev=net0{virtio_extra}"),
        ]);
    } else {
        push(&["-nic", "none"]);
    }
    Ok(a)
}

/// The host's C-bit position from CPUID 0x8000001F EBX\[5:0\], or 51 (Milan/Genoa/Turin).
pub fn host_cbitpos() -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
        if max >= 0x8000_001f {
            let ebx = std::arch::x86_64::__cpuid(0x8000_001f).ebx & 0x3f;
            if ebx != 0 {
                return ebx;
            }
        }
    }
    51
}

#[cfg(test)]
mod tests;
