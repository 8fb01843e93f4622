//! `vouch image build|measure|show`: the reproducible guest image and its expected launch
//! measurement (see `docs/vm.md`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vm_image::image::{files, ImageSpec, Manifest};
use vm_image::measure::{self, SnpInputs, SnpParams};

use super::{CmdResult, Global};

/// SNP launch parameters that change the measurement.
#[derive(Debug, clap::Args)]
pub struct SnpArgs {
    /// Number of vCPUs the SNP guest is launched with.
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// QEMU CPU model of the SNP guest (EPYC-v4, EPYC-Milan, EPYC-Genoa, …).
    #[arg(long)]
    pub vcpu_type: Option<String>,
    /// SEV_FEATURES of the guest (hex or decimal), 0x1 with host kernels ≥ 6.8.
    #[arg(long, value_parser = parse_u64)]
    pub guest_features: Option<u64>,
    /// VMM type: qemu, ec2 or krun.
    #[arg(long)]
    pub vmm_type: Option<String>,
}

impl SnpArgs {
    fn params(&self, base: SnpParams) -> SnpParams {
        SnpParams {
            vcpus: self.vcpus.unwrap_or(base.vcpus),
            vcpu_type: self.vcpu_type.clone().unwrap_or(base.vcpu_type),
            guest_features: self.guest_features.unwrap_or(base.guest_features),
            vmm_type: self.vmm_type.clone().unwrap_or(base.vmm_type),
        }
    }
}

fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))
}

/// Subcommands of `vouch image`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Build the image: the kernel (cached), the initramfs around the static agent, the manifest.
    Build {
        /// Output directory (default: $VOUCH_IMAGE_DIR, else $VOUCH_CACHE/image).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The static `vouch-agent` binary (default: $VOUCH_AGENT).
        #[arg(long, env = "VOUCH_AGENT")]
        agent: PathBuf,
        /// An AmdSev OVMF (OvmfPkg/AmdSev) to compute the expected SNP measurement against.
        #[arg(long)]
        ovmf: Option<PathBuf>,
        /// Debian's kernel source tarball.
        #[arg(long, default_value = vm_image::kernel::DEFAULT_SOURCE_TARBALL)]
        kernel_source: PathBuf,
        #[command(flatten)]
        snp: SnpArgs,
        /// vCPU counts to record an expected SNP measurement for, besides --vcpus (the launcher
        /// needs the one of the VM size it launches: each vCPU's VMSA is measured).
        #[arg(long, value_delimiter = ',', default_values_t = vm_image::image::DEFAULT_VCPU_COUNTS.to_vec())]
        vcpu_counts: Vec<u32>,
    },
    /// Recompute the expected SNP launch measurement offline.
    Measure {
        /// Take kernel, initrd, command line (and OVMF, SNP parameters) from this image.
        #[arg(long, conflicts_with_all = ["kernel", "initrd", "append"])]
        image: Option<PathBuf>,
        /// The `-bios` file (an AmdSev OVMF for measured direct boot).
        #[arg(long)]
        ovmf: Option<PathBuf>,
        /// Precomputed OVMF digest (hex), instead of hashing the OVMF pages.
        #[arg(long)]
        ovmf_hash: Option<String>,
        /// `-kernel` (the bzImage).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// `-initrd`.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// `-append`.
        #[arg(long)]
        append: Option<String>,
        #[command(flatten)]
        snp: SnpArgs,
    },
    /// Print an image's manifest (after checking its files against it).
    Show {
        /// Image directory (default: $VOUCH_IMAGE_DIR, else $VOUCH_CACHE/image).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Print `{"image": DIR, "manifest": {…}}` (the manifest as `manifest.json` has it).
        #[arg(long)]
        json: bool,
    },
}

fn agent_version(agent: &Path) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let out = std::process::Command::new(agent)
        .arg("--version")
        .output()
        .map_err(|e| format!("running {} --version: {e}", agent.display()))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || !v.starts_with("vouch-agent ") {
        return Err(format!(
            "{} is not a vouch-agent binary (--version said {v:?})",
            agent.display()
        )
        .into());
    }
    Ok(v)
}

/// Run `vouch image …`.
pub fn run(cmd: Command, _global: &Global) -> CmdResult {
    match cmd {
        Command::Build { out, agent, ovmf, kernel_source, snp, vcpu_counts } => {
            let out = out.unwrap_or_else(vm_image::default_image_dir);
            let cache = vm_image::cache_dir();
            let version = agent_version(&agent)?;
            let kernel = vm_image::ensure_kernel(&cache, &kernel_source, &mut |line| {
                eprintln!("vouch: kernel: {line}")
            })?;
            let spec = ImageSpec {
                agent: &agent,
                agent_version: version,
                kernel: &kernel,
                ovmf: ovmf.as_deref(),
                snp: snp.params(SnpParams::default()),
                vcpu_counts: &vcpu_counts,
            };
            let m = vm_image::build_image(&spec, &out)?;
            println!("image: {}", out.display());
            print_manifest(&m);
            Ok(ExitCode::SUCCESS)
        }
        Command::Measure { image, ovmf, ovmf_hash, kernel, initrd, append, snp } => {
            let (params, kernel, initrd, append, ovmf) = match image {
                Some(dir) => {
                    let m = Manifest::load(&dir)?;
                    let base = m.snp.as_ref().map(|s| s.params.clone()).unwrap_or_default();
                    let ovmf = ovmf.or_else(|| m.snp.as_ref().map(|_| dir.join(files::OVMF)));
                    (
                        snp.params(base),
                        Some(dir.join(files::BZIMAGE)),
                        Some(dir.join(files::INITRD)),
                        Some(m.cmdline),
                        ovmf,
                    )
                }
                None => (snp.params(SnpParams::default()), kernel, initrd, append, ovmf),
            };
            let ovmf = ovmf.ok_or("--ovmf is required (or an image built with --ovmf)")?;
            let inputs = SnpInputs {
                ovmf: &ovmf,
                kernel: kernel.as_deref(),
                initrd: initrd.as_deref(),
                cmdline: append.as_deref(),
                ovmf_hash: ovmf_hash.as_deref(),
            };
            let digest = measure::snp_measurement(&inputs, &params)?;
            println!("measurement: {}", hex::encode(digest));
            println!("ovmf: {}", ovmf.display());
            println!(
                "kernel: {}",
                kernel.as_ref().map_or("(none)".into(), |p| p.display().to_string())
            );
            println!(
                "initrd: {}",
                initrd.as_ref().map_or("(none)".into(), |p| p.display().to_string())
            );
            println!("append: {}", append.as_deref().unwrap_or("(none)"));
            println!(
                "vcpus: {} vcpu-type: {} guest-features: {:#x} vmm-type: {}",
                params.vcpus, params.vcpu_type, params.guest_features, params.vmm_type
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { image, json } => {
            let dir = image.unwrap_or_else(vm_image::default_image_dir);
            let m = Manifest::load(&dir)?;
            m.verify_files(&dir)?;
            if json {
                let v = serde_json::json!({ "image": dir, "files_match": true, "manifest": m });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("image: {} (files match the manifest)", dir.display());
            print_manifest(&m);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_manifest(m: &Manifest) {
    println!("agent: {} (sha256 {})", m.agent_version, m.agent_sha256);
    println!("kernel: {} / gcc: {}", m.kernel_key.source, m.kernel_key.gcc);
    println!("vmlinux: sha256 {} ({} bytes)", m.vmlinux.sha256, m.vmlinux.size);
    println!("bzImage: sha256 {} ({} bytes)", m.bzimage.sha256, m.bzimage.size);
    println!("initrd: sha256 {} ({} bytes)", m.initrd.sha256, m.initrd.size);
    println!("cmdline: {}", m.cmdline);
    println!("simulated measurement: {}", m.simulated_measurement);
    match &m.snp {
        Some(s) => {
            println!(
                "SNP measurement: {} (OVMF sha256 {}, {} vCPU {}, guest features {:#x}, {})",
                s.expected_measurement,
                s.ovmf.sha256,
                s.params.vcpus,
                s.params.vcpu_type,
                s.params.guest_features,
                s.params.vmm_type
            );
            for shape in &s.measurements {
                println!(
                    "SNP measurement, {} vCPU {}: {}",
                    shape.vcpus, shape.vcpu_type, shape.measurement
                );
            }
        }
        None => {
            println!("SNP measurement: none (built without an AmdSev OVMF; snp mode unavailable)")
        }
    }
}
