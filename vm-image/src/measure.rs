//! Launch measurements of the guest image.
//!
//! What is here:
//! - [`SnpParams`] and [`snp_measurement`]: the expected SEV-SNP launch digest (MEASUREMENT) of
//!   QEMU booting our bzImage + initrd + command line through an AmdSev OVMF with
//!   `kernel-hashes=on`, computed offline with `sev::measurement`. Every input that changes it is
//!   a field: OVMF bytes, kernel, initrd, command line, vCPU count and model, guest features
//!   (SEV_FEATURES) and VMM type. Not in it: guest policy, HOST_DATA, memory size, devices.
//! - [`simulated_measurement`]: what simulated evidence (no SNP hardware) carries in its
//!   MEASUREMENT field so a policy can still pin the image:
//!   `SHA-384("vouch-simulated-measurement-v1\0" ‖ sha256(vmlinux) ‖ sha256(bzImage) ‖
//!   sha256(initrd) ‖ sha256(cmdline bytes))`, each SHA-256 as 32 raw bytes.
//!
//! What is not here: checking a report against these values (that is `build-trace`).

use std::path::{Path, PathBuf};

use sev::measurement::snp::{snp_calc_launch_digest, SnpMeasurementArgs};
use sev::measurement::vcpu_types::CpuType;
use sev::measurement::vmsa::{GuestFeatures, VMMType};
use sev::parser::ByteParser;
use sha2::{Digest, Sha384};

/// Domain separation tag of the simulated measurement.
pub const SIMULATED_MEASUREMENT_TAG: &[u8] = b"vouch-simulated-measurement-v1\0";

/// Errors from measuring.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The vCPU model name is not one `sev` knows.
    #[error("unknown vCPU type {0:?} (e.g. EPYC-v4, EPYC-Milan, EPYC-Genoa, EPYC-Turin)")]
    VcpuType(String),
    /// The VMM type is not qemu/ec2/krun.
    #[error("unknown VMM type {0:?} (qemu, ec2 or krun)")]
    VmmType(String),
    /// The OVMF has no SNP_KERNEL_HASHES section, so QEMU cannot measure a direct kernel boot.
    #[error("{0} is not an AmdSev OVMF: it has no SNP_KERNEL_HASHES section (measured direct boot needs OvmfPkg/AmdSev)")]
    NoKernelHashes(PathBuf),
    /// `sev` failed to compute the digest.
    #[error("computing the SNP launch digest")]
    Sev(#[source] sev::error::MeasurementError),
}

/// The launch inputs besides the image files that change the SNP measurement.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnpParams {
    /// Number of vCPUs (one VMSA page each).
    pub vcpus: u32,
    /// QEMU CPU model (`-cpu`), e.g. `EPYC-v4`.
    pub vcpu_type: String,
    /// SEV_FEATURES of the VMSA; 0x1 (SNPActive) with host kernels ≥ 6.8 defaults.
    pub guest_features: u64,
    /// `qemu`, `ec2` or `krun`.
    pub vmm_type: String,
}

impl Default for SnpParams {
    fn default() -> Self {
        SnpParams {
            vcpus: 1,
            vcpu_type: "EPYC-v4".into(),
            guest_features: 0x1,
            vmm_type: "qemu".into(),
        }
    }
}

/// Files measured by QEMU with `kernel-hashes=on`.
#[derive(Debug, Clone)]
pub struct SnpInputs<'a> {
    /// The whole `-bios` file.
    pub ovmf: &'a Path,
    /// `-kernel` (the bzImage), or `None` for a firmware-only measurement.
    pub kernel: Option<&'a Path>,
    /// `-initrd`.
    pub initrd: Option<&'a Path>,
    /// `-append`, exactly.
    pub cmdline: Option<&'a str>,
    /// Precomputed OVMF digest (hex), as `sev-snp-measure --ovmf-hash`.
    pub ovmf_hash: Option<&'a str>,
}

fn cpu_type(name: &str) -> Result<CpuType, MeasureError> {
    CpuType::try_from(name.to_ascii_lowercase().as_str())
        .map_err(|_| MeasureError::VcpuType(name.to_owned()))
}

/// Whether `ovmf` has the SNP_KERNEL_HASHES section (an AmdSev build).
pub fn ovmf_supports_kernel_hashes(ovmf: &Path) -> Result<bool, MeasureError> {
    let o = sev::measurement::ovmf::OVMF::new(ovmf.to_owned()).map_err(MeasureError::Sev)?;
    Ok(o.is_sev_hashes_table_supported())
}

/// The expected SNP launch digest (48 bytes).
pub fn snp_measurement(
    inputs: &SnpInputs<'_>,
    params: &SnpParams,
) -> Result<[u8; 48], MeasureError> {
    let vmm: VMMType =
        params.vmm_type.parse().map_err(|_| MeasureError::VmmType(params.vmm_type.clone()))?;
    if inputs.kernel.is_some() && !ovmf_supports_kernel_hashes(inputs.ovmf)? {
        return Err(MeasureError::NoKernelHashes(inputs.ovmf.to_owned()));
    }
    let features = GuestFeatures::from_bytes(&params.guest_features.to_le_bytes())
        .map_err(|e| MeasureError::Sev(e.into()))?;
    let ld = snp_calc_launch_digest(SnpMeasurementArgs {
        vcpus: params.vcpus,
        vcpu_type: cpu_type(&params.vcpu_type)?,
        ovmf_file: inputs.ovmf.to_owned(),
        guest_features: features,
        kernel_file: inputs.kernel.map(Path::to_owned),
        initrd_file: inputs.initrd.map(Path::to_owned),
        append: inputs.cmdline,
        ovmf_hash_str: inputs.ovmf_hash,
        vmm_type: Some(vmm),
    })
    .map_err(MeasureError::Sev)?;
    let bytes: Vec<u8> = ld.try_into().map_err(MeasureError::Sev)?;
    let mut out = [0u8; 48];
    out.copy_from_slice(&bytes);
    Ok(out)
}

/// The simulated measurement (see the module doc) from the image's SHA-256 digests.
pub fn simulated_measurement(
    vmlinux_sha256: &[u8; 32],
    bzimage_sha256: &[u8; 32],
    initrd_sha256: &[u8; 32],
    cmdline_sha256: &[u8; 32],
) -> [u8; 48] {
    let mut h = Sha384::new();
    h.update(SIMULATED_MEASUREMENT_TAG);
    for d in [vmlinux_sha256, bzimage_sha256, initrd_sha256, cmdline_sha256] {
        h.update(d);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `test-support/data/snp/virtee-sev`.
    fn vectors() -> PathBuf {
        test_support::snp::testdata().join("virtee-sev")
    }

    fn epyc_v4(features: u64) -> SnpParams {
        SnpParams { guest_features: features, ..SnpParams::default() }
    }

    /// The virtee vectors' inputs: `/dev/null` as kernel and initrd.
    fn null_kernel<'a>(
        ovmf: &'a Path,
        cmdline: Option<&'a str>,
        ovmf_hash: Option<&'a str>,
    ) -> SnpInputs<'a> {
        let null = Path::new("/dev/null");
        SnpInputs { ovmf, kernel: Some(null), initrd: Some(null), cmdline, ovmf_hash }
    }

    /// `inputs` measure to `want` on EPYC-v4 with guest features 0x1 and 0x21.
    fn assert_epyc_v4_digests(inputs: &SnpInputs<'_>, want: [&str; 2]) {
        for (features, want) in [0x1, 0x21].into_iter().zip(want) {
            let got = hex::encode(snp_measurement(inputs, &epyc_v4(features)).unwrap());
            assert_eq!(got, want, "guest features {features:#x}");
        }
    }

    // Expected digests: test-support/data/snp/README.md (virtee/sev tests, cross-checked with
    // sev-snp-measure 0.0.13).
    #[test]
    fn virtee_vectors_with_kernel_initrd_and_cmdline() {
        let ovmf = vectors().join("ovmf_AmdSev_suffix.bin");
        let inputs = null_kernel(&ovmf, Some("console=ttyS0 loglevel=7"), None);
        assert_epyc_v4_digests(
            &inputs,
            [
                "6d287813eb5222d770f75005c664e34c204f385ce832cc2ce7d0d6f354454362f390ef83a92046c042e706363b4b08fa",
                "803f691094946e42068aaa3a8f9e26a5c89f36f7b73ecfb28c653360fe4b3aba7e534442e7e1e17895dfe778d0228977",
            ],
        );
    }

    #[test]
    fn virtee_vectors_with_ovmf_hash_and_no_cmdline() {
        let ovmf = vectors().join("ovmf_AmdSev_suffix.bin");
        let hash = "086e2e9149ebf45abdc3445fba5b2da8270bdbb04094d7a2c37faaa4b24af3aa16aff8c374c2a55c467a50da6d466b74";
        let inputs = null_kernel(&ovmf, None, Some(hash));
        assert_epyc_v4_digests(
            &inputs,
            [
                "ddc5224521617a536ee7ce9dd6224d1b58a8d4fda1c741f3ac99fc4bfa04ba6e9fc98646d4a07a9079397fa3852819b5",
                "329c8ce0972ae52343b64d34a434a86f245dfd74f5ed7aae15d22efc78fb9683632b9b50e4e1d7fa41179ef98a7ef198",
            ],
        );
    }

    #[test]
    fn non_amdsev_ovmf_cannot_measure_a_kernel() {
        let ovmf = vectors().join("ovmf_OvmfX64_suffix.bin");
        assert!(!ovmf_supports_kernel_hashes(&ovmf).unwrap());
        let inputs = SnpInputs {
            ovmf: &ovmf,
            kernel: Some(Path::new("/dev/null")),
            initrd: None,
            cmdline: None,
            ovmf_hash: None,
        };
        assert!(matches!(
            snp_measurement(&inputs, &SnpParams::default()),
            Err(MeasureError::NoKernelHashes(_))
        ));
    }

    #[test]
    fn every_parameter_changes_the_digest() {
        let ovmf = vectors().join("ovmf_AmdSev_suffix.bin");
        let inputs = null_kernel(&ovmf, Some("a"), None);
        let base = snp_measurement(&inputs, &SnpParams::default()).unwrap();
        let variants = [
            SnpParams { vcpus: 2, ..SnpParams::default() },
            SnpParams { vcpu_type: "EPYC-Milan".into(), ..SnpParams::default() },
            SnpParams { guest_features: 0x21, ..SnpParams::default() },
            SnpParams { vmm_type: "ec2".into(), ..SnpParams::default() },
        ];
        for p in variants {
            assert_ne!(snp_measurement(&inputs, &p).unwrap(), base, "{p:?}");
        }
        let other = SnpInputs { cmdline: Some("b"), ..inputs.clone() };
        assert_ne!(snp_measurement(&other, &SnpParams::default()).unwrap(), base);
        assert!(matches!(
            snp_measurement(
                &inputs,
                &SnpParams { vcpu_type: "pentium".into(), ..SnpParams::default() }
            ),
            Err(MeasureError::VcpuType(_))
        ));
    }

    #[test]
    fn simulated_measurement_is_a_tagged_sha384() {
        let (a, b, c, d) = ([1u8; 32], [2u8; 32], [3u8; 32], [4u8; 32]);
        let m = simulated_measurement(&a, &b, &c, &d);
        let mut h = Sha384::new();
        h.update(b"vouch-simulated-measurement-v1\0");
        h.update(a);
        h.update(b);
        h.update(c);
        h.update(d);
        assert_eq!(m.to_vec(), h.finalize().to_vec());
        assert_ne!(simulated_measurement(&a, &b, &d, &c), m);
    }
}
