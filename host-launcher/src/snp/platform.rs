//! What the host's AMD secure processor says about itself: the decoded `SNP_PLATFORM_STATUS`
//! ([`PlatformStatus`]), the chip ID, and the product (from this CPU's CPUID), which together
//! name the VCEK a report of this host needs ([`HostIdentity`]).
//!
//! The REPORTED_TCB that reports carry, and that names the VCEK, is the platform status's
//! `reported_tcb_version`: the host can hold it below the current TCB (SNP_SET_CONFIG), so the
//! VCEK for the *reported* TCB is the one to fetch.

use std::fmt;
use std::fs::File;

use build_trace::evidence::report::{Product, TcbVersion};

use super::sys::{self, status_offset as off, SNP_STATUS_LEN};

/// Decoded `struct sev_user_data_snp_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PlatformStatus {
    /// Firmware API major version.
    pub api_major: u8,
    /// Firmware API minor version.
    pub api_minor: u8,
    /// Platform state (0 UNINIT, 1 INIT).
    pub state: u8,
    /// The RMP table is initialised (SNP is usable).
    pub is_rmp_initialized: bool,
    /// Firmware build.
    pub build_id: u32,
    /// CHIP_ID is zeroed in reports.
    pub mask_chip_id: bool,
    /// Reports are not signed.
    pub mask_chip_key: bool,
    /// A VLEK hashstick is loaded (reports are signed by the VLEK, not the VCEK).
    pub vlek_en: bool,
    /// Guests the firmware manages now.
    pub guest_count: u32,
    /// Installed TCB, raw (its layout depends on the product).
    pub current_tcb: [u8; 8],
    /// TCB put in reports, raw.
    pub reported_tcb: [u8; 8],
}

impl PlatformStatus {
    /// Decode the raw status bytes (little-endian; C bit fields from bit 0 on x86).
    pub fn decode(b: &[u8; SNP_STATUS_LEN]) -> PlatformStatus {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let tcb_at = |o: usize| {
            let mut t = [0u8; 8];
            t.copy_from_slice(&b[o..o + 8]);
            t
        };
        let flags = u32_at(off::FLAGS);
        PlatformStatus {
            api_major: b[off::API_MAJOR],
            api_minor: b[off::API_MINOR],
            state: b[off::STATE],
            is_rmp_initialized: b[off::RMP_BYTE] & 1 != 0,
            build_id: u32_at(off::BUILD_ID),
            mask_chip_id: flags & 1 != 0,
            mask_chip_key: flags & 2 != 0,
            vlek_en: flags & 4 != 0,
            guest_count: u32_at(off::GUEST_COUNT),
            current_tcb: tcb_at(off::CURRENT_TCB),
            reported_tcb: tcb_at(off::REPORTED_TCB),
        }
    }

    /// The firmware version as `major.minor (build N)`.
    pub fn firmware(&self) -> String {
        format!("{}.{} (build {})", self.api_major, self.api_minor, self.build_id)
    }
}

/// The EPYC product of a CPU from CPUID leaf 1's EAX (family and model with their extended
/// parts); Bergamo and Siena are Genoa-family parts and use Genoa's KDS product, as AMD does.
pub fn product_from_cpuid_eax(eax: u32) -> Option<Product> {
    let base_family = (eax >> 8) & 0xf;
    let family = if base_family == 0xf { base_family + ((eax >> 20) & 0xff) } else { base_family };
    let model = ((eax >> 4) & 0xf) | (((eax >> 16) & 0xf) << 4);
    Product::from_cpuid(family as u8, model as u8)
}

/// This CPU's product, if it is an EPYC that vouch knows.
pub fn host_product() -> Option<Product> {
    #[cfg(target_arch = "x86_64")]
    {
        product_from_cpuid_eax(std::arch::x86_64::__cpuid(1).eax)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Which VCEK this host's reports need: product, chip ID and the reported TCB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    /// The product.
    pub product: Product,
    /// CHIP_ID (64 bytes; on Turin the KDS uses the first 8).
    pub chip_id: Vec<u8>,
    /// The reported TCB.
    pub tcb: TcbVersion,
}

impl HostIdentity {
    /// From a raw attestation report of this host (its CHIP_ID and REPORTED_TCB; the product
    /// from CPUID (v3+), a Turin-shaped CHIP_ID, else `fallback`).
    pub fn from_report(raw: &[u8], fallback: Option<Product>) -> Result<HostIdentity, String> {
        use build_trace::evidence::report::{offset, ProductHint, Report};
        let r = Report::parse(raw).map_err(|e| e.to_string())?;
        let product = match (r.product_hint(), fallback) {
            (ProductHint::Known(p), _) => p,
            (_, Some(p)) => p,
            (hint, None) => {
                return Err(format!(
                    "the report does not say its product ({hint}): give --product milan|genoa|turin"
                ))
            }
        };
        let chip_id = raw[offset::CHIP_ID..offset::CHIP_ID + 64].to_vec();
        if chip_id.iter().all(|b| *b == 0) {
            return Err("the report's CHIP_ID is masked (MASK_CHIP_ID=1): no VCEK can be named; \
                 clear mask_chip_id with SNP_SET_CONFIG or use a VLEK"
                .into());
        }
        let mut t = [0u8; 8];
        t.copy_from_slice(&raw[offset::REPORTED_TCB..offset::REPORTED_TCB + 8]);
        Ok(HostIdentity { product, chip_id, tcb: TcbVersion::decode(t, product.tcb_layout()) })
    }

    /// The chip ID as the KDS names it: 64 bytes, or 8 on Turin.
    pub fn hw_id(&self) -> &[u8] {
        match self.product {
            Product::Turin => &self.chip_id[..8.min(self.chip_id.len())],
            _ => &self.chip_id,
        }
    }
}

impl fmt::Display for HostIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} chip {}… TCB {}", self.product, &hex::encode(self.hw_id())[..16], self.tcb)
    }
}

/// What `/dev/sev` told us.
#[derive(Debug, Clone)]
pub struct Platform {
    /// The decoded status.
    pub status: PlatformStatus,
    /// The chip ID (`SEV_GET_ID2`), if that command worked.
    pub chip_id: Option<Vec<u8>>,
    /// The CPU's product.
    pub product: Option<Product>,
}

impl Platform {
    /// Query `/dev/sev` (read-only commands).
    pub fn query(dev: &File) -> Result<Platform, sys::SevCmdError> {
        let status = PlatformStatus::decode(&sys::snp_platform_status(dev)?);
        let chip_id = sys::get_id(dev).ok().map(|mut id| {
            id.truncate(64);
            id
        });
        Ok(Platform { status, chip_id, product: host_product() })
    }

    /// Open `/dev/sev` and query it.
    pub fn probe() -> Result<Platform, String> {
        let dev = File::open("/dev/sev").map_err(|e| format!("/dev/sev: {e}"))?;
        Platform::query(&dev).map_err(|e| build_trace::error_chain(&e))
    }

    /// The identity the reports of this host carry (reported TCB), if everything is known.
    pub fn identity(&self) -> Option<HostIdentity> {
        let product = self.product?;
        let chip_id = self.chip_id.clone()?;
        Some(HostIdentity {
            product,
            chip_id,
            tcb: TcbVersion::decode(self.status.reported_tcb, product.tcb_layout()),
        })
    }

    /// Decoded current TCB.
    pub fn current_tcb(&self) -> Option<TcbVersion> {
        self.product.map(|p| TcbVersion::decode(self.status.current_tcb, p.tcb_layout()))
    }
}

/// Whether TCB `a` is below `b` in any component (the order AMD's firmware uses for
/// "at least": every SPL at least as high).
pub fn tcb_below(a: &TcbVersion, b: &TcbVersion) -> bool {
    a.fmc.unwrap_or(0) < b.fmc.unwrap_or(0)
        || a.bootloader < b.bootloader
        || a.tee < b.tee
        || a.snp < b.snp
        || a.microcode < b.microcode
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_bytes() -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0] = 1; // api 1.55
        b[1] = 55;
        b[2] = 1; // INIT
        b[3] = 0b1; // RMP initialised
        b[4..8].copy_from_slice(&21u32.to_le_bytes());
        b[8..12].copy_from_slice(&0b100u32.to_le_bytes()); // VLEK loaded
        b[12..16].copy_from_slice(&3u32.to_le_bytes());
        b[16..24].copy_from_slice(&[4, 0, 0, 0, 0, 0, 24, 219]);
        b[24..32].copy_from_slice(&[3, 0, 0, 0, 0, 0, 8, 115]);
        b
    }

    #[test]
    fn decodes_the_bit_fields_and_tcbs() {
        let s = PlatformStatus::decode(&status_bytes());
        assert_eq!((s.api_major, s.api_minor, s.state, s.build_id), (1, 55, 1, 21));
        assert!(s.is_rmp_initialized && s.vlek_en && !s.mask_chip_id && !s.mask_chip_key);
        assert_eq!(s.guest_count, 3);
        assert_eq!(s.firmware(), "1.55 (build 21)");
        let mut b = status_bytes();
        b[3] = 0b1111_1110; // reserved bits set, RMP bit clear
        b[8..12].copy_from_slice(&0b011u32.to_le_bytes());
        let s = PlatformStatus::decode(&b);
        assert!(!s.is_rmp_initialized && s.mask_chip_id && s.mask_chip_key && !s.vlek_en);
        let p = Platform { status: s, chip_id: Some(vec![7; 64]), product: Some(Product::Milan) };
        let id = p.identity().unwrap();
        assert_eq!(id.tcb.to_string(), "bootloader=3 tee=0 snp=8 microcode=115");
        assert!(tcb_below(&id.tcb, &p.current_tcb().unwrap()));
        assert!(!tcb_below(&p.current_tcb().unwrap(), &id.tcb));
    }

    #[test]
    fn cpuid_names_the_products() {
        // EPYC 7763 (Milan): family 19h model 01h; 9654 (Genoa): 19h/11h; 9B14 (Bergamo):
        // 19h/A0h; Turin: 1Ah/02h; Rome (17h/31h) is not SNP-capable here.
        assert_eq!(product_from_cpuid_eax(0x00a0_0f11), Some(Product::Milan));
        assert_eq!(product_from_cpuid_eax(0x00a1_0f11), Some(Product::Genoa));
        assert_eq!(product_from_cpuid_eax(0x00aa_0f01), Some(Product::Genoa));
        assert_eq!(product_from_cpuid_eax(0x00b0_0f21), Some(Product::Turin));
        assert_eq!(product_from_cpuid_eax(0x0083_0f10), None);
    }

    #[test]
    fn identity_from_real_reports() {
        let milan = include_bytes!("../../tests/data/snp/report_milan.bin");
        let id = HostIdentity::from_report(milan, None).unwrap_err();
        assert!(id.contains("--product"), "a v2 report cannot tell Milan from Genoa: {id}");
        let id = HostIdentity::from_report(milan, Some(Product::Milan)).unwrap();
        assert_eq!(id.tcb.to_string(), "bootloader=3 tee=0 snp=8 microcode=115");
        assert_eq!(id.hw_id().len(), 64);
        let turin = include_bytes!("../../tests/data/snp/turin_attestation_report.bin");
        let id = HostIdentity::from_report(turin, None).unwrap();
        assert_eq!(id.product, Product::Turin);
        assert_eq!(hex::encode(id.hw_id()), "59790fb1c39f35c1");
        assert_eq!(id.tcb.fmc, Some(1));
    }
}
