//! Assembling an image directory and its manifest.
//!
//! An image directory holds `vmlinux` (kvm/tcg, PVH entry), `bzImage` (snp, through OVMF),
//! `initrd.cpio` (uncompressed newc, `/init` = the static `vouch-agent`), optionally
//! `OVMF.amdsev.fd`, and `manifest.json` ([`Manifest`]): SHA-256 of every file, the fixed
//! command line, the agent version, the kernel's build key, the simulated measurement and, with
//! an AmdSev OVMF, the expected SNP launch measurement together with every launch parameter
//! that changes it — one measurement per vCPU count and CPU model the launcher may use (a VMSA
//! per vCPU is measured, so every VM size has its own; [`SnpLaunch::measurement_for`]). The
//! same inputs always give the same bytes in every file.
//!
//! What is not here: building the kernel ([`crate::kernel`]) or launching anything.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cpio::{self, Entry};
use crate::kernel::{Kernel, KernelKey};
use crate::measure::{self, SnpInputs, SnpParams};

/// The guest kernel command line. Fixed: never anything job-specific (it is measured).
/// `panic=-1` with QEMU's `-no-reboot` turns a guest panic into a QEMU exit.
pub const CMDLINE: &str = "console=ttyS0 quiet panic=-1 vouch.port=1024";

/// Manifest format identifier.
pub const MANIFEST_FORMAT: &str = "vouch-image-manifest-v1";

/// File names inside an image directory.
pub mod files {
    /// Uncompressed kernel ELF (PVH entry).
    pub const VMLINUX: &str = "vmlinux";
    /// EFI-stub compressed kernel.
    pub const BZIMAGE: &str = "bzImage";
    /// The initramfs.
    pub const INITRD: &str = "initrd.cpio";
    /// AmdSev OVMF copied in, when given.
    pub const OVMF: &str = "OVMF.amdsev.fd";
    /// The manifest.
    pub const MANIFEST: &str = "manifest.json";
}

/// Errors from assembling or loading an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// File system trouble.
    #[error("{0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// Writing the initramfs failed.
    #[error("writing the initramfs")]
    Cpio(#[from] cpio::CpioError),
    /// Measuring failed.
    #[error("computing the launch measurement")]
    Measure(#[from] measure::MeasureError),
    /// The manifest is not valid JSON of our format.
    #[error("image manifest {0} is invalid")]
    BadManifest(PathBuf, #[source] serde_json::Error),
    /// A file does not match the manifest.
    #[error("image file {0} does not match its manifest hash (rebuild the image: scripts/build-image.sh)")]
    Mismatch(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |e| ImageError::Io(path.to_owned(), e)
}

/// One file of the image: its name in the directory, SHA-256 and size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileDigest {
    /// File name inside the image directory.
    pub file: String,
    /// Lower-case hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

impl FileDigest {
    fn of(dir: &Path, name: &str) -> Result<Self, ImageError> {
        let p = dir.join(name);
        // Streamed: the launcher checks the image before every step, and a whole-file buffer
        // (the 26 MB vmlinux) per step stayed in the allocator's per-thread arenas of a
        // long-running server (`docs/benchmarks.md`, soak).
        let mut hasher = Sha256::new();
        let size = fs::File::open(&p)
            .and_then(|mut f| std::io::copy(&mut f, &mut hasher))
            .map_err(io(&p))?;
        Ok(FileDigest { file: name.to_owned(), sha256: hex::encode(hasher.finalize()), size })
    }

    fn raw(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        if let Ok(v) = hex::decode(&self.sha256) {
            if v.len() == 32 {
                out.copy_from_slice(&v);
            }
        }
        out
    }
}

/// vCPU counts an image is measured for by default (besides the default launch's).
pub const DEFAULT_VCPU_COUNTS: &[u32] = &[1, 2, 4, 8];

/// The expected SNP measurement of one VM shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnpShape {
    /// vCPU count.
    pub vcpus: u32,
    /// QEMU CPU model (`-cpu`).
    pub vcpu_type: String,
    /// Hex of the 48-byte expected MEASUREMENT.
    pub measurement: String,
}

/// The expected SNP launch for an AmdSev OVMF.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnpLaunch {
    /// The OVMF file (copied into the image directory).
    pub ovmf: FileDigest,
    /// The default launch: vCPU count and model, guest features, VMM type.
    #[serde(flatten)]
    pub params: SnpParams,
    /// Hex of the 48-byte expected MEASUREMENT of the default launch, for bzImage + initrd +
    /// cmdline with kernel hashes.
    pub expected_measurement: String,
    /// One expected measurement per vCPU count and model the image was measured for (same
    /// guest features and VMM type), the default launch's among them.
    #[serde(default)]
    pub measurements: Vec<SnpShape>,
}

impl SnpLaunch {
    /// The expected measurement (hex) of a VM with `vcpus` vCPUs of model `vcpu_type`, if the
    /// image was measured for that shape.
    pub fn measurement_for(&self, vcpus: u32, vcpu_type: &str) -> Option<&str> {
        if vcpus == self.params.vcpus && vcpu_type == self.params.vcpu_type {
            return Some(&self.expected_measurement);
        }
        self.measurements
            .iter()
            .find(|s| s.vcpus == vcpus && s.vcpu_type == vcpu_type)
            .map(|s| s.measurement.as_str())
    }

    /// The measured shapes, as `N×model` for messages.
    pub fn shapes(&self) -> String {
        let v: Vec<String> =
            self.measurements.iter().map(|s| format!("{}×{}", s.vcpus, s.vcpu_type)).collect();
        v.join(", ")
    }
}

/// `manifest.json` of an image directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// `vouch-agent --version` of the `/init` inside the initrd.
    pub agent_version: String,
    /// SHA-256 of the agent binary.
    pub agent_sha256: String,
    /// What the kernel was built from.
    pub kernel_key: KernelKey,
    /// The PVH kernel (kvm/tcg).
    pub vmlinux: FileDigest,
    /// The EFI-stub kernel (snp).
    pub bzimage: FileDigest,
    /// The initramfs.
    pub initrd: FileDigest,
    /// The kernel command line.
    pub cmdline: String,
    /// SHA-256 of the command line bytes.
    pub cmdline_sha256: String,
    /// Hex of the simulated measurement (see [`measure::simulated_measurement`]).
    pub simulated_measurement: String,
    /// Present when built with an AmdSev OVMF.
    pub snp: Option<SnpLaunch>,
}

impl Manifest {
    /// Read `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        let p = dir.join(files::MANIFEST);
        let bytes = fs::read(&p).map_err(io(&p))?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::BadManifest(p, e))
    }

    /// Check every file named in the manifest against its hash.
    pub fn verify_files(&self, dir: &Path) -> Result<(), ImageError> {
        let mut all = vec![&self.vmlinux, &self.bzimage, &self.initrd];
        if let Some(snp) = &self.snp {
            all.push(&snp.ovmf);
        }
        for f in all {
            if &FileDigest::of(dir, &f.file)? != f {
                return Err(ImageError::Mismatch(dir.join(&f.file)));
            }
        }
        Ok(())
    }

    /// The simulated measurement as bytes.
    pub fn simulated_measurement_bytes(&self) -> [u8; 48] {
        measure::simulated_measurement(
            &self.vmlinux.raw(),
            &self.bzimage.raw(),
            &self.initrd.raw(),
            &Sha256::digest(self.cmdline.as_bytes()).into(),
        )
    }
}

/// What to assemble.
#[derive(Debug, Clone)]
pub struct ImageSpec<'a> {
    /// The static `vouch-agent` binary.
    pub agent: &'a Path,
    /// Its `--version` line.
    pub agent_version: String,
    /// The cached kernel build.
    pub kernel: &'a Kernel,
    /// An AmdSev OVMF to measure against (copied into the image).
    pub ovmf: Option<&'a Path>,
    /// SNP launch parameters of the default launch.
    pub snp: SnpParams,
    /// vCPU counts to measure besides the default launch's (same model, features, VMM).
    pub vcpu_counts: &'a [u32],
}

/// The initramfs members: the agent as `/init`, a console node and the mount points it uses.
pub fn initramfs_entries(agent: Vec<u8>) -> Vec<Entry> {
    vec![
        Entry::file("init", 0o755, agent),
        Entry::dir("dev", 0o755),
        Entry::char_dev("dev/console", 0o600, 5, 1),
        Entry::dir("proc", 0o555),
        Entry::dir("sys", 0o555),
        Entry::dir("tmp", 0o1777),
        Entry::dir("etc", 0o755),
        Entry::dir("build", 0o755),
        Entry::dir("nix", 0o755),
        Entry::dir("nix/store", 0o755),
    ]
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension("tmp-vouch");
    fs::write(&tmp, bytes).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

fn copy_atomic(from: &Path, to: &Path) -> Result<(), ImageError> {
    let bytes = fs::read(from).map_err(io(from))?;
    write_atomic(to, &bytes)
}

/// Write the image into `out` (created if needed; files replaced atomically, the manifest
/// last) and return its manifest.
pub fn build_image(spec: &ImageSpec<'_>, out: &Path) -> Result<Manifest, ImageError> {
    fs::create_dir_all(out).map_err(io(out))?;
    let agent = fs::read(spec.agent).map_err(io(spec.agent))?;
    let agent_sha256 = hex::encode(Sha256::digest(&agent));
    let mut initrd = Vec::with_capacity(agent.len() + 4096);
    cpio::write_newc(&initramfs_entries(agent), &mut initrd)?;
    write_atomic(&out.join(files::INITRD), &initrd)?;
    copy_atomic(&spec.kernel.vmlinux, &out.join(files::VMLINUX))?;
    copy_atomic(&spec.kernel.bzimage, &out.join(files::BZIMAGE))?;

    let vmlinux = FileDigest::of(out, files::VMLINUX)?;
    let bzimage = FileDigest::of(out, files::BZIMAGE)?;
    let initrd = FileDigest::of(out, files::INITRD)?;
    let cmdline_sha256: [u8; 32] = Sha256::digest(CMDLINE.as_bytes()).into();
    let simulated = measure::simulated_measurement(
        &vmlinux.raw(),
        &bzimage.raw(),
        &initrd.raw(),
        &cmdline_sha256,
    );

    let snp = match spec.ovmf {
        None => {
            let _ = fs::remove_file(out.join(files::OVMF));
            None
        }
        Some(ovmf) => {
            copy_atomic(ovmf, &out.join(files::OVMF))?;
            let inputs = SnpInputs {
                ovmf: &out.join(files::OVMF),
                kernel: Some(&out.join(files::BZIMAGE)),
                initrd: Some(&out.join(files::INITRD)),
                cmdline: Some(CMDLINE),
                ovmf_hash: None,
            };
            let m = measure::snp_measurement(&inputs, &spec.snp)?;
            let mut counts: Vec<u32> =
                spec.vcpu_counts.iter().copied().chain([spec.snp.vcpus]).collect();
            counts.sort_unstable();
            counts.dedup();
            let measurements = counts
                .into_iter()
                .map(|vcpus| {
                    let params = SnpParams { vcpus, ..spec.snp.clone() };
                    Ok(SnpShape {
                        vcpus,
                        vcpu_type: params.vcpu_type.clone(),
                        measurement: hex::encode(measure::snp_measurement(&inputs, &params)?),
                    })
                })
                .collect::<Result<_, ImageError>>()?;
            Some(SnpLaunch {
                ovmf: FileDigest::of(out, files::OVMF)?,
                params: spec.snp.clone(),
                expected_measurement: hex::encode(m),
                measurements,
            })
        }
    };

    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_owned(),
        agent_version: spec.agent_version.clone(),
        agent_sha256,
        kernel_key: spec.kernel.key.clone(),
        vmlinux,
        bzimage,
        initrd,
        cmdline: CMDLINE.to_owned(),
        cmdline_sha256: hex::encode(cmdline_sha256),
        simulated_measurement: hex::encode(simulated),
        snp,
    };
    let mut json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| ImageError::BadManifest(out.join(files::MANIFEST), e))?;
    json.push(b'\n');
    write_atomic(&out.join(files::MANIFEST), &json)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_kernel(dir: &Path) -> Kernel {
        fs::write(dir.join("vmlinux"), b"\x7fELF fake vmlinux").unwrap();
        fs::write(dir.join("bzImage"), b"MZ fake bzImage").unwrap();
        fs::write(dir.join("config"), b"CONFIG_X=y\n").unwrap();
        Kernel {
            bzimage: dir.join("bzImage"),
            vmlinux: dir.join("vmlinux"),
            config: dir.join("config"),
            key: KernelKey {
                source: "linux-source-6.12 test".into(),
                gcc: "gcc".into(),
                ld: "ld".into(),
                fragment_sha256: "f".into(),
                build_path: "/b".into(),
            },
        }
    }

    fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).unwrap()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn two_builds_from_the_same_inputs_are_byte_identical() {
        let t = tempfile::tempdir().unwrap();
        let kernel = fake_kernel(t.path());
        let agent = t.path().join("agent");
        fs::write(&agent, vec![0xabu8; 100_001]).unwrap();
        let spec = ImageSpec {
            agent: &agent,
            agent_version: "vouch-agent 0.1.0".into(),
            kernel: &kernel,
            ovmf: None,
            snp: SnpParams::default(),
            vcpu_counts: DEFAULT_VCPU_COUNTS,
        };
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        let ma = build_image(&spec, &a).unwrap();
        let mb = build_image(&spec, &b).unwrap();
        assert_eq!(ma, mb);
        assert_eq!(dir_bytes(&a), dir_bytes(&b));
        assert_eq!(Manifest::load(&a).unwrap(), ma);
        ma.verify_files(&a).unwrap();
        assert_eq!(hex::encode(ma.simulated_measurement_bytes()), ma.simulated_measurement);
        assert!(ma.snp.is_none());

        // A different agent changes the initrd and the simulated measurement.
        fs::write(&agent, vec![0xacu8; 100_001]).unwrap();
        let mc = build_image(&spec, &t.path().join("c")).unwrap();
        assert_ne!(mc.initrd.sha256, ma.initrd.sha256);
        assert_ne!(mc.simulated_measurement, ma.simulated_measurement);

        // Tampering is detected.
        fs::write(a.join(files::INITRD), b"evil").unwrap();
        assert!(matches!(ma.verify_files(&a), Err(ImageError::Mismatch(_))));
    }

    #[test]
    fn with_an_amdsev_ovmf_the_manifest_carries_the_expected_measurement() {
        let ovmf = test_support::snp::testdata().join("virtee-sev/ovmf_AmdSev_suffix.bin");
        let t = tempfile::tempdir().unwrap();
        let kernel = fake_kernel(t.path());
        let agent = t.path().join("agent");
        fs::write(&agent, b"agent").unwrap();
        let spec = ImageSpec {
            agent: &agent,
            agent_version: "v".into(),
            kernel: &kernel,
            ovmf: Some(&ovmf),
            snp: SnpParams::default(),
            vcpu_counts: &[2, 4],
        };
        let out = t.path().join("img");
        let m = build_image(&spec, &out).unwrap();
        let snp = m.snp.clone().unwrap();
        let (kernel, initrd) = (out.join(files::BZIMAGE), out.join(files::INITRD));
        let inputs = SnpInputs {
            ovmf: &ovmf,
            kernel: Some(&kernel),
            initrd: Some(&initrd),
            cmdline: Some(CMDLINE),
            ovmf_hash: None,
        };
        let again = measure::snp_measurement(&inputs, &SnpParams::default()).unwrap();
        assert_eq!(snp.expected_measurement, hex::encode(again));
        // One measurement per vCPU count (a VMSA per vCPU is measured): 1 (the default), 2, 4.
        assert_eq!(snp.measurements.iter().map(|s| s.vcpus).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!(snp.measurement_for(1, "EPYC-v4"), Some(snp.expected_measurement.as_str()));
        for shape in &snp.measurements {
            let params = SnpParams { vcpus: shape.vcpus, ..SnpParams::default() };
            let want = measure::snp_measurement(&inputs, &params).unwrap();
            assert_eq!(snp.measurement_for(shape.vcpus, "EPYC-v4"), Some(&*hex::encode(want)));
        }
        assert_ne!(snp.measurement_for(2, "EPYC-v4"), snp.measurement_for(4, "EPYC-v4"));
        assert_eq!(snp.measurement_for(8, "EPYC-v4"), None, "not measured");
        assert_eq!(snp.measurement_for(2, "EPYC-Milan"), None, "another model");
        assert_eq!(Manifest::load(&out).unwrap(), m);
        m.verify_files(&out).unwrap();
        let json = fs::read_to_string(out.join(files::MANIFEST)).unwrap();
        for field in [
            "\"vcpus\": 1",
            "\"vcpu_type\": \"EPYC-v4\"",
            "\"guest_features\": 1",
            "\"vmm_type\": \"qemu\"",
        ] {
            assert!(json.contains(field), "{field} in {json}");
        }
    }

    #[test]
    fn cmdline_is_fixed_and_has_the_channel_port() {
        assert!(CMDLINE.contains("vouch.port=1024"));
        assert!(CMDLINE.contains("panic=-1"));
        assert!(!CMDLINE.contains("acpi=off"), "power-off needs ACPI");
    }
}
