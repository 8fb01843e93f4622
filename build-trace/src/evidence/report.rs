//! The raw SEV-SNP `ATTESTATION_REPORT` layout (SNP ABI spec, table "ATTESTATION_REPORT
//! Structure"), read straight from the 1184 bytes the firmware returned.
//!
//! What is here: [`Report`], a parsed copy of every field at its fixed offset (versions 2, 3
//! and 5), the TCB encodings of Milan/Genoa and Turin ([`TcbVersion`], [`TcbLayout`]), guest
//! policy / key info bit helpers, product hints from CPUID and CHIP_ID, the list of reserved
//! byte ranges, and the signed region.
//!
//! What is not here: any trust decision. Parsing succeeds on any 1184-byte buffer whose version
//! is supported; it does not look at the signature. We parse the raw layout ourselves rather
//! than through `sev::firmware::guest::AttestationReport` because that type refuses version-2
//! reports with a masked CHIP_ID and re-encodes fields (the tests check that both parsers agree
//! on every real report).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Length of an SNP attestation report.
pub const REPORT_LEN: usize = 0x4A0;
/// The signature covers bytes `0..SIGNED_LEN`.
pub const SIGNED_LEN: usize = 0x2A0;
/// `SIGNATURE_ALGO` value for ECDSA P-384 with SHA-384.
pub const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;
/// Report versions this verifier understands.
pub const SUPPORTED_VERSIONS: [u32; 3] = [2, 3, 5];

/// Offsets of the fields (SNP ABI spec; checked against real reports).
pub mod offset {
    pub const VERSION: usize = 0x00;
    pub const GUEST_SVN: usize = 0x04;
    pub const POLICY: usize = 0x08;
    pub const FAMILY_ID: usize = 0x10;
    pub const IMAGE_ID: usize = 0x20;
    pub const VMPL: usize = 0x30;
    pub const SIG_ALGO: usize = 0x34;
    pub const CURRENT_TCB: usize = 0x38;
    pub const PLATFORM_INFO: usize = 0x40;
    pub const KEY_INFO: usize = 0x48;
    pub const REPORT_DATA: usize = 0x50;
    pub const MEASUREMENT: usize = 0x90;
    pub const HOST_DATA: usize = 0xC0;
    pub const ID_KEY_DIGEST: usize = 0xE0;
    pub const AUTHOR_KEY_DIGEST: usize = 0x110;
    pub const REPORT_ID: usize = 0x140;
    pub const REPORT_ID_MA: usize = 0x160;
    pub const REPORTED_TCB: usize = 0x180;
    pub const CPUID_FAM_ID: usize = 0x188;
    pub const CPUID_MOD_ID: usize = 0x189;
    pub const CPUID_STEP: usize = 0x18A;
    pub const CHIP_ID: usize = 0x1A0;
    pub const COMMITTED_TCB: usize = 0x1E0;
    pub const CURRENT_VERSION: usize = 0x1E8;
    pub const COMMITTED_VERSION: usize = 0x1EC;
    pub const LAUNCH_TCB: usize = 0x1F0;
    pub const LAUNCH_MIT_VECTOR: usize = 0x1F8;
    pub const CURRENT_MIT_VECTOR: usize = 0x200;
    pub const SIGNATURE_R: usize = 0x2A0;
    pub const SIGNATURE_S: usize = 0x2E8;
    pub const SIGNATURE_RESERVED: usize = 0x330;
}

/// Guest policy bits (SNP ABI spec, "Guest Policy Structure").
pub mod policy_bits {
    pub const SMT: u64 = 1 << 16;
    pub const RESERVED_ONE: u64 = 1 << 17;
    pub const MIGRATE_MA: u64 = 1 << 18;
    pub const DEBUG: u64 = 1 << 19;
    pub const SINGLE_SOCKET: u64 = 1 << 20;
    /// Bits 26..63 are reserved and must be zero.
    pub const RESERVED_ZERO: u64 = !((1 << 26) - 1);
}

/// An AMD EPYC product line whose root key vouches for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Product {
    Milan,
    Genoa,
    Turin,
}

impl Product {
    pub const ALL: [Product; 3] = [Product::Milan, Product::Genoa, Product::Turin];

    /// How REPORTED_TCB and friends are encoded on this product.
    pub fn tcb_layout(self) -> TcbLayout {
        match self {
            Product::Milan | Product::Genoa => TcbLayout::MilanGenoa,
            Product::Turin => TcbLayout::Turin,
        }
    }

    /// The product named by a VCEK/VLEK `productName` extension ("Milan-B0", "Genoa", "Turin").
    pub fn from_cert_name(name: &str) -> Option<Product> {
        let family = name.split('-').next().unwrap_or("");
        Product::ALL.into_iter().find(|p| p.name() == family)
    }

    /// The product of a CPU, from CPUID family and model (as the report's v3+ fields carry).
    pub fn from_cpuid(family: u8, model: u8) -> Option<Product> {
        match (family, model) {
            (0x19, 0x00..=0x0F) => Some(Product::Milan),
            (0x19, 0x10..=0x1F) | (0x19, 0xA0..=0xAF) => Some(Product::Genoa),
            (0x1A, 0x00..=0x11) => Some(Product::Turin),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Product::Milan => "Milan",
            Product::Genoa => "Genoa",
            Product::Turin => "Turin",
        }
    }
}

impl fmt::Display for Product {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The byte layout of a TCB_VERSION field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcbLayout {
    /// Milan and Genoa: `[bootloader, tee, 0, 0, 0, 0, snp, microcode]`.
    MilanGenoa,
    /// Turin: `[fmc, bootloader, tee, snp, 0, 0, 0, microcode]`.
    Turin,
}

impl TcbLayout {
    /// Indices of the bytes that must be zero.
    fn reserved(self) -> std::ops::Range<usize> {
        match self {
            TcbLayout::MilanGenoa => 2..6,
            TcbLayout::Turin => 4..7,
        }
    }
}

/// A decoded TCB_VERSION: the security patch levels (SPLs) of each firmware component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcbVersion {
    /// FMC SPL (Turin and later only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

impl TcbVersion {
    pub fn decode(raw: [u8; 8], layout: TcbLayout) -> TcbVersion {
        match layout {
            TcbLayout::MilanGenoa => TcbVersion {
                fmc: None,
                bootloader: raw[0],
                tee: raw[1],
                snp: raw[6],
                microcode: raw[7],
            },
            TcbLayout::Turin => TcbVersion {
                fmc: Some(raw[0]),
                bootloader: raw[1],
                tee: raw[2],
                snp: raw[3],
                microcode: raw[7],
            },
        }
    }

    pub fn encode(&self, layout: TcbLayout) -> [u8; 8] {
        match layout {
            TcbLayout::MilanGenoa => {
                [self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode]
            }
            TcbLayout::Turin => [
                self.fmc.unwrap_or(0),
                self.bootloader,
                self.tee,
                self.snp,
                0,
                0,
                0,
                self.microcode,
            ],
        }
    }

    /// The components as `(name, value)` pairs, FMC first when present.
    pub fn components(&self) -> Vec<(&'static str, u8)> {
        let mut out = Vec::with_capacity(5);
        if let Some(fmc) = self.fmc {
            out.push(("fmc", fmc));
        }
        out.extend([
            ("bootloader", self.bootloader),
            ("tee", self.tee),
            ("snp", self.snp),
            ("microcode", self.microcode),
        ]);
        out
    }
}

impl fmt::Display for TcbVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> =
            self.components().iter().map(|(n, v)| format!("{n}={v}")).collect();
        f.write_str(&parts.join(" "))
    }
}

/// Which key signed a report (KEY_INFO bits 4:2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SigningKey {
    Vcek,
    Vlek,
    None,
    Reserved(u8),
}

impl fmt::Display for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SigningKey::Vcek => f.write_str("VCEK"),
            SigningKey::Vlek => f.write_str("VLEK"),
            SigningKey::None => f.write_str("no key"),
            SigningKey::Reserved(v) => write!(f, "reserved value {v}"),
        }
    }
}

/// What the report itself says about the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProductHint {
    /// CPUID fields (v3+) or a Turin-shaped CHIP_ID (v2) name this product.
    Known(Product),
    /// A v2 report with a 64-byte CHIP_ID: Milan or Genoa (same layout, cannot tell).
    MilanOrGenoa,
    /// A v2 report with a masked CHIP_ID: no hint.
    Masked,
    /// CPUID names a CPU this verifier does not know.
    UnknownCpu { family: u8, model: u8 },
}

impl ProductHint {
    pub fn admits(self, product: Product) -> bool {
        match self {
            ProductHint::Known(p) => p == product,
            ProductHint::MilanOrGenoa => matches!(product, Product::Milan | Product::Genoa),
            ProductHint::Masked => true,
            ProductHint::UnknownCpu { .. } => false,
        }
    }
}

impl fmt::Display for ProductHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProductHint::Known(p) => write!(f, "{p}"),
            ProductHint::MilanOrGenoa => f.write_str("Milan or Genoa (v2 CHIP_ID)"),
            ProductHint::Masked => f.write_str("unknown (v2, CHIP_ID masked)"),
            ProductHint::UnknownCpu { family, model } => {
                write!(f, "unknown CPU (family {family:#04x} model {model:#04x})")
            }
        }
    }
}

/// A parsed SNP attestation report. All fields are copies of the raw bytes; TCB fields stay raw
/// until a [`TcbLayout`] is known (it depends on the product).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    raw: Box<[u8; REPORT_LEN]>,
}

/// Why bytes are not a report we can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportFormatError {
    #[error("report is {0} bytes, an SNP attestation report is exactly 1184 bytes")]
    Length(usize),
    #[error("report version {0} is not supported (supported: 2, 3 and 5)")]
    Version(u32),
}

impl Report {
    /// Parse a raw report; checks only the length and the version.
    pub fn parse(bytes: &[u8]) -> Result<Report, ReportFormatError> {
        let raw: [u8; REPORT_LEN] =
            bytes.try_into().map_err(|_| ReportFormatError::Length(bytes.len()))?;
        let report = Report { raw: Box::new(raw) };
        if !SUPPORTED_VERSIONS.contains(&report.version()) {
            return Err(ReportFormatError::Version(report.version()));
        }
        Ok(report)
    }

    pub fn raw(&self) -> &[u8; REPORT_LEN] {
        &self.raw
    }
    /// The bytes the signature covers (`0x000..0x2A0`).
    pub fn signed_bytes(&self) -> &[u8] {
        &self.raw[..SIGNED_LEN]
    }

    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.arr(off))
    }
    fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.arr(off))
    }
    fn arr<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.raw[off..off + N]);
        out
    }

    pub fn version(&self) -> u32 {
        self.u32_at(offset::VERSION)
    }
    pub fn guest_svn(&self) -> u32 {
        self.u32_at(offset::GUEST_SVN)
    }
    pub fn policy(&self) -> u64 {
        self.u64_at(offset::POLICY)
    }
    pub fn family_id(&self) -> [u8; 16] {
        self.arr(offset::FAMILY_ID)
    }
    pub fn image_id(&self) -> [u8; 16] {
        self.arr(offset::IMAGE_ID)
    }
    pub fn vmpl(&self) -> u32 {
        self.u32_at(offset::VMPL)
    }
    pub fn sig_algo(&self) -> u32 {
        self.u32_at(offset::SIG_ALGO)
    }
    pub fn current_tcb_raw(&self) -> [u8; 8] {
        self.arr(offset::CURRENT_TCB)
    }
    pub fn platform_info(&self) -> u64 {
        self.u64_at(offset::PLATFORM_INFO)
    }
    pub fn key_info(&self) -> u32 {
        self.u32_at(offset::KEY_INFO)
    }
    /// KEY_INFO bit 0: the ID block was signed with an author key.
    pub fn author_key_en(&self) -> bool {
        self.key_info() & 1 != 0
    }
    /// KEY_INFO bit 1: the firmware did not sign (MASK_CHIP_KEY).
    pub fn mask_chip_key(&self) -> bool {
        self.key_info() & 2 != 0
    }
    /// KEY_INFO bits 4:2.
    pub fn signing_key(&self) -> SigningKey {
        match (self.key_info() >> 2) & 7 {
            0 => SigningKey::Vcek,
            1 => SigningKey::Vlek,
            7 => SigningKey::None,
            v => SigningKey::Reserved(v as u8),
        }
    }
    pub fn report_data(&self) -> [u8; 64] {
        self.arr(offset::REPORT_DATA)
    }
    pub fn measurement(&self) -> [u8; 48] {
        self.arr(offset::MEASUREMENT)
    }
    pub fn host_data(&self) -> [u8; 32] {
        self.arr(offset::HOST_DATA)
    }
    pub fn id_key_digest(&self) -> [u8; 48] {
        self.arr(offset::ID_KEY_DIGEST)
    }
    pub fn author_key_digest(&self) -> [u8; 48] {
        self.arr(offset::AUTHOR_KEY_DIGEST)
    }
    pub fn report_id(&self) -> [u8; 32] {
        self.arr(offset::REPORT_ID)
    }
    pub fn report_id_ma(&self) -> [u8; 32] {
        self.arr(offset::REPORT_ID_MA)
    }
    pub fn reported_tcb_raw(&self) -> [u8; 8] {
        self.arr(offset::REPORTED_TCB)
    }
    /// CPUID family, model and stepping (version 3 and later).
    pub fn cpuid(&self) -> Option<(u8, u8, u8)> {
        (self.version() >= 3).then(|| {
            (
                self.raw[offset::CPUID_FAM_ID],
                self.raw[offset::CPUID_MOD_ID],
                self.raw[offset::CPUID_STEP],
            )
        })
    }
    pub fn chip_id(&self) -> [u8; 64] {
        self.arr(offset::CHIP_ID)
    }
    /// True when CHIP_ID is all zero (MASK_CHIP_ID was set at launch).
    pub fn chip_id_masked(&self) -> bool {
        self.raw[offset::CHIP_ID..offset::CHIP_ID + 64].iter().all(|&b| b == 0)
    }
    pub fn committed_tcb_raw(&self) -> [u8; 8] {
        self.arr(offset::COMMITTED_TCB)
    }
    /// Firmware version `(major, minor, build)` the platform runs.
    pub fn current_version(&self) -> (u8, u8, u8) {
        let o = offset::CURRENT_VERSION;
        (self.raw[o + 2], self.raw[o + 1], self.raw[o])
    }
    /// Committed firmware version `(major, minor, build)`.
    pub fn committed_version(&self) -> (u8, u8, u8) {
        let o = offset::COMMITTED_VERSION;
        (self.raw[o + 2], self.raw[o + 1], self.raw[o])
    }
    pub fn launch_tcb_raw(&self) -> [u8; 8] {
        self.arr(offset::LAUNCH_TCB)
    }
    /// LAUNCH_MIT_VECTOR and CURRENT_MIT_VECTOR (version 5 and later).
    pub fn mit_vectors(&self) -> Option<(u64, u64)> {
        (self.version() >= 5).then(|| {
            (self.u64_at(offset::LAUNCH_MIT_VECTOR), self.u64_at(offset::CURRENT_MIT_VECTOR))
        })
    }
    /// Signature r and s as the firmware stores them: 72 bytes each, little-endian.
    pub fn signature_le(&self) -> ([u8; 72], [u8; 72]) {
        (self.arr(offset::SIGNATURE_R), self.arr(offset::SIGNATURE_S))
    }

    /// What the report says about its product.
    pub fn product_hint(&self) -> ProductHint {
        if let Some((family, model, _)) = self.cpuid() {
            return match Product::from_cpuid(family, model) {
                Some(p) => ProductHint::Known(p),
                None => ProductHint::UnknownCpu { family, model },
            };
        }
        let chip = self.chip_id();
        if chip.iter().all(|&b| b == 0) {
            ProductHint::Masked
        } else if chip[8..].iter().all(|&b| b == 0) {
            ProductHint::Known(Product::Turin)
        } else {
            ProductHint::MilanOrGenoa
        }
    }

    /// Byte ranges that are reserved in this version (and, for TCB fields, this layout) and
    /// must be zero. The last range is the unsigned area after the signature.
    pub fn reserved_ranges(&self, layout: TcbLayout) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::with_capacity(14);
        out.push(0x4C..0x50);
        if self.version() >= 3 {
            out.push(0x18B..0x1A0);
        } else {
            out.push(0x188..0x1A0);
        }
        out.push(0x1EB..0x1EC);
        out.push(0x1EF..0x1F0);
        if self.version() >= 5 {
            out.push(0x208..SIGNED_LEN);
        } else {
            out.push(0x1F8..SIGNED_LEN);
        }
        for tcb in
            [offset::CURRENT_TCB, offset::REPORTED_TCB, offset::COMMITTED_TCB, offset::LAUNCH_TCB]
        {
            let r = layout.reserved();
            out.push(tcb + r.start..tcb + r.end);
        }
        // r and s are 72-byte little-endian fields holding 48-byte values.
        out.push(offset::SIGNATURE_R + 48..offset::SIGNATURE_R + 72);
        out.push(offset::SIGNATURE_S + 48..offset::SIGNATURE_S + 72);
        out.push(offset::SIGNATURE_RESERVED..REPORT_LEN);
        out
    }

    /// The first non-zero reserved byte, if any.
    pub fn first_nonzero_reserved(&self, layout: TcbLayout) -> Option<usize> {
        self.reserved_ranges(layout)
            .into_iter()
            .flat_map(|r| r.into_iter())
            .find(|&i| self.raw[i] != 0)
    }

    /// A human-readable listing of every field (`vouch evidence show`). The TCB fields are
    /// decoded with `layout` when it is known, shown raw otherwise.
    pub fn describe(&self, layout: Option<TcbLayout>) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<22} {v}\n"));
        let tcb = |raw: [u8; 8]| match layout {
            Some(l) => format!("{} (raw {})", TcbVersion::decode(raw, l), hex::encode(raw)),
            None => format!("raw {}", hex::encode(raw)),
        };
        line("VERSION", self.version().to_string());
        line("GUEST_SVN", self.guest_svn().to_string());
        line("POLICY", describe_policy(self.policy()));
        line("FAMILY_ID", hex::encode(self.family_id()));
        line("IMAGE_ID", hex::encode(self.image_id()));
        line("VMPL", self.vmpl().to_string());
        line("SIGNATURE_ALGO", format!("{} ({})", self.sig_algo(), sig_algo_name(self.sig_algo())));
        line("CURRENT_TCB", tcb(self.current_tcb_raw()));
        line("PLATFORM_INFO", format!("{:#x}", self.platform_info()));
        line(
            "KEY_INFO",
            format!(
                "{:#x} (signing key {}, mask_chip_key {}, author_key_en {})",
                self.key_info(),
                self.signing_key(),
                self.mask_chip_key() as u8,
                self.author_key_en() as u8
            ),
        );
        line("REPORT_DATA", hex::encode(self.report_data()));
        line("MEASUREMENT", hex::encode(self.measurement()));
        line("HOST_DATA", hex::encode(self.host_data()));
        line("ID_KEY_DIGEST", hex::encode(self.id_key_digest()));
        line("AUTHOR_KEY_DIGEST", hex::encode(self.author_key_digest()));
        line("REPORT_ID", hex::encode(self.report_id()));
        line("REPORT_ID_MA", hex::encode(self.report_id_ma()));
        line("REPORTED_TCB", tcb(self.reported_tcb_raw()));
        if let Some((f, m, st)) = self.cpuid() {
            line("CPUID", format!("family {f:#04x} model {m:#04x} stepping {st:#04x}"));
        }
        line("PRODUCT (from report)", self.product_hint().to_string());
        line("CHIP_ID", hex::encode(self.chip_id()));
        line("COMMITTED_TCB", tcb(self.committed_tcb_raw()));
        let (a, b, c) = self.current_version();
        line("CURRENT_VERSION", format!("{a}.{b}.{c}"));
        let (a, b, c) = self.committed_version();
        line("COMMITTED_VERSION", format!("{a}.{b}.{c}"));
        line("LAUNCH_TCB", tcb(self.launch_tcb_raw()));
        if let Some((l, c)) = self.mit_vectors() {
            line("LAUNCH_MIT_VECTOR", format!("{l:#x}"));
            line("CURRENT_MIT_VECTOR", format!("{c:#x}"));
        }
        let (r, sig_s) = self.signature_le();
        line("SIGNATURE_R (LE)", hex::encode(&r[..48]));
        line("SIGNATURE_S (LE)", hex::encode(&sig_s[..48]));
        s
    }
}

/// `0x30000 (abi 0.0, SMT, reserved-1, ...)`.
pub fn describe_policy(policy: u64) -> String {
    let mut flags = vec![format!("abi {}.{}", (policy >> 8) & 0xFF, policy & 0xFF)];
    for (bit, name) in [
        (policy_bits::SMT, "SMT allowed"),
        (policy_bits::RESERVED_ONE, "bit17"),
        (policy_bits::MIGRATE_MA, "MIGRATE_MA allowed"),
        (policy_bits::DEBUG, "DEBUG allowed"),
        (policy_bits::SINGLE_SOCKET, "single socket"),
    ] {
        if policy & bit != 0 {
            flags.push(name.to_string());
        }
    }
    format!("{policy:#x} ({})", flags.join(", "))
}

fn sig_algo_name(algo: u32) -> &'static str {
    if algo == SIG_ALGO_ECDSA_P384_SHA384 {
        "ECDSA P-384 with SHA-384"
    } else {
        "unknown"
    }
}
