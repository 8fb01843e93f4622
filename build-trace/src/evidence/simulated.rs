//! Simulated SNP evidence, for hosts without SEV-SNP: a per-host P-384 "simulated ARK → VCEK"
//! chain and reports in the exact AMD layout signed by the simulated VCEK.
//!
//! **Simulated evidence proves nothing about hardware.** The host generates the root, keeps it
//! in its state directory and hands the simulated VCEK's secret key to its own guests over the
//! channel so they can sign reports; whoever holds that key (the host, or anyone who reads the
//! state directory) can sign any report. That is honest only because a verifier treats such
//! evidence as what it is: the verifier classifies evidence by the pinned root that verified
//! it, accepts a simulated root only when its policy names that root's key (SPKI SHA-256), and
//! every output that involves one says "SIMULATED".
//!
//! Report layout (see `docs/evidence.md`): version 5, SIGNATURE_ALGO 1, KEY_INFO 0 (VCEK),
//! CPUID family/model/stepping 0 (no real CPU), every TCB field in the Milan/Genoa encoding,
//! PLATFORM_INFO 0, firmware version 0.0.0, REPORT_ID random per attester, REPORT_ID_MA all
//! 0xFF (no migration agent), mitigation vectors 0, reserved bytes zero.
//!
//! By feature: the attester ([`SimulatedAttester`], what the guest needs) with
//! `simulated-attester`; generating, keeping and loading roots ([`SimulatedRoot`]) with `producer`.
//!
//! What is not here: the guest-side transport of the key (agent) or the decision to use
//! simulated evidence (launcher).

#[cfg(feature = "producer")]
use std::fs;
#[cfg(feature = "producer")]
use std::io::Write as _;
#[cfg(feature = "producer")]
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
#[cfg(feature = "producer")]
use std::path::Path;
use std::path::PathBuf;
#[cfg(feature = "producer")]
use std::time::{Duration, SystemTime};

#[cfg(feature = "producer")]
use der::asn1::{BitString, Ia5StringRef, ObjectIdentifier, OctetString};
#[cfg(feature = "producer")]
use der::{Decode, Encode};
use p384::ecdsa::signature::hazmat::PrehashSigner;
#[cfg(feature = "producer")]
use p384::ecdsa::signature::Signer as _;
use p384::pkcs8::DecodePrivateKey;
#[cfg(feature = "producer")]
use p384::pkcs8::{EncodePrivateKey, EncodePublicKey};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha384};
#[cfg(feature = "producer")]
use x509_cert::ext::Extension;
#[cfg(feature = "producer")]
use x509_cert::name::Name;
#[cfg(feature = "producer")]
use x509_cert::serial_number::SerialNumber;
#[cfg(feature = "producer")]
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
#[cfg(feature = "producer")]
use x509_cert::time::{Time, Validity};
#[cfg(feature = "producer")]
use x509_cert::{Certificate, TbsCertificate, Version};

#[cfg(feature = "producer")]
use super::bundle::EvidenceBundle;
#[cfg(feature = "producer")]
use super::certs::{self, oid, VekExtensions};
#[cfg(feature = "producer")]
use super::policy::{EvidencePolicy, Hex, KeyId};
use super::report::{offset, TcbLayout, TcbVersion, REPORT_LEN, SIGNED_LEN};

#[cfg(feature = "producer")]
/// The directory, under a host's state directory, that holds its simulated root.
pub const SIMULATED_ROOT_DIR: &str = "simulated-snp";
#[cfg(feature = "producer")]
/// Subject CN of every simulated ARK.
pub const SIMULATED_ARK_CN: &str = "vouch SIMULATED ARK (no SEV-SNP hardware)";
#[cfg(feature = "producer")]
/// productName extension of every simulated VCEK.
pub const SIMULATED_PRODUCT: &str = "vouch-simulated";
#[cfg(feature = "producer")]
/// The TCB simulated roots are generated with.
pub const SIMULATED_TCB: TcbVersion =
    TcbVersion { fmc: None, bootloader: 1, tee: 1, snp: 1, microcode: 1 };
/// Guest policy of simulated launches unless the launcher says otherwise: SMT allowed, bit 17.
pub const DEFAULT_GUEST_POLICY: u64 = 0x30000;

#[cfg(feature = "producer")]
const ARK_FILE: &str = "ark.der";
#[cfg(feature = "producer")]
const VCEK_FILE: &str = "vcek.der";
#[cfg(feature = "producer")]
const VCEK_KEY_FILE: &str = "vcek.key";

#[cfg(feature = "producer")]
/// The name a host signs Nix records under: `<host>-1` with SEV-SNP, `<host>-simulated-1`
/// without, so a plain Nix user sees the difference in `trusted-public-keys`. Characters Nix
/// does not allow in key names (`:` and whitespace) become `-`.
pub fn nix_key_name(host: &str, simulated: bool) -> String {
    let host: String =
        host.chars().map(|c| if c == ':' || c.is_whitespace() { '-' } else { c }).collect();
    if simulated {
        format!("{host}-simulated-1")
    } else {
        format!("{host}-1")
    }
}

/// Why the simulated root could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum SimulatedError {
    #[error("{path}: I/O error")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a usable simulated root file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("simulated VCEK key is not a PKCS#8 P-384 key")]
    Key(#[source] p384::pkcs8::Error),
    #[cfg(feature = "producer")]
    #[error("building a simulated certificate failed")]
    Certificate(#[source] der::Error),
}

/// The platform facts a simulated VCEK certifies (its hwID and TCB extensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimulatedPlatform {
    pub chip_id: [u8; 64],
    pub tcb: TcbVersion,
}

#[cfg(feature = "producer")]
/// A host's simulated root: ARK certificate, VCEK certificate and the VCEK's secret key.
pub struct SimulatedRoot {
    key_id: KeyId,
    ark_der: Vec<u8>,
    vcek_der: Vec<u8>,
    vcek_key: p384::ecdsa::SigningKey,
    platform: SimulatedPlatform,
}

#[cfg(feature = "producer")]
impl std::fmt::Debug for SimulatedRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedRoot").field("key_id", &self.key_id()).finish_non_exhaustive()
    }
}

#[cfg(feature = "producer")]
impl SimulatedRoot {
    /// A fresh root in memory with a random CHIP_ID and [`SIMULATED_TCB`].
    pub fn generate() -> Result<SimulatedRoot, SimulatedError> {
        let mut chip_id = [0u8; 64];
        OsRng.fill_bytes(&mut chip_id);
        SimulatedRoot::generate_for(SimulatedPlatform { chip_id, tcb: SIMULATED_TCB })
    }

    /// A fresh root in memory certifying `platform`, its certificates valid from a day ago to
    /// 9999. The ARK's secret key is dropped once it has signed the VCEK.
    pub fn generate_for(platform: SimulatedPlatform) -> Result<SimulatedRoot, SimulatedError> {
        let now = SystemTime::now();
        let not_before = now.checked_sub(Duration::from_secs(86_400)).unwrap_or(now);
        let not_after = der::DateTime::new(9999, 12, 31, 23, 59, 59)
            .map_err(SimulatedError::Certificate)?
            .to_system_time();
        SimulatedRoot::generate_valid(platform, not_before, not_after)
    }

    /// [`SimulatedRoot::generate_for`] with both certificates valid only from `not_before` to
    /// `not_after`: a root that a host with a wrong clock, or one whose certificates expired,
    /// would have (the fault tests make one).
    pub fn generate_valid(
        platform: SimulatedPlatform,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<SimulatedRoot, SimulatedError> {
        let validity =
            Validity { not_before: x509_time(not_before)?, not_after: x509_time(not_after)? };
        let ark_key = p384::ecdsa::SigningKey::random(&mut OsRng);
        let vcek_key = p384::ecdsa::SigningKey::random(&mut OsRng);
        let ark_name: Name = format!("CN={SIMULATED_ARK_CN},O=vouch simulated evidence")
            .parse()
            .map_err(SimulatedError::Certificate)?;
        let vcek_name: Name =
            "CN=vouch SIMULATED VCEK (no SEV-SNP hardware),O=vouch simulated evidence"
                .parse()
                .map_err(SimulatedError::Certificate)?;
        let basic_ca = Extension {
            extn_id: ObjectIdentifier::new_unwrap("2.5.29.19"),
            critical: true,
            // BasicConstraints { cA TRUE }
            extn_value: OctetString::new(vec![0x30, 0x03, 0x01, 0x01, 0xFF])
                .map_err(SimulatedError::Certificate)?,
        };
        let ark = issue(
            &ark_key,
            &ark_name,
            &ark_name,
            ark_key.verifying_key(),
            vec![basic_ca],
            validity,
        )?;
        let ark_der = ark.to_der().map_err(SimulatedError::Certificate)?;
        let vcek = issue(
            &ark_key,
            &ark_name,
            &vcek_name,
            vcek_key.verifying_key(),
            vcek_extensions(&platform)?,
            validity,
        )?;
        let vcek_der = vcek.to_der().map_err(SimulatedError::Certificate)?;
        let key_id = Hex(certs::spki_sha256(&ark));
        Ok(SimulatedRoot { key_id, ark_der, vcek_der, vcek_key, platform })
    }

    /// Load the root kept in `dir` (`ark.der`, `vcek.der`, `vcek.key`), or generate one and
    /// write it there: directory mode 0700, files 0600, created atomically (a concurrent
    /// caller either wins the rename or loads the winner's files). Damaged files are an error,
    /// never silently replaced. `dir` belongs in the host's state directory, never in a
    /// repository or a guest image.
    pub fn load_or_generate(dir: &Path) -> Result<SimulatedRoot, SimulatedError> {
        if dir.join(VCEK_KEY_FILE).exists() {
            return SimulatedRoot::load(dir);
        }
        let root = SimulatedRoot::generate()?;
        match root.save(dir) {
            Ok(()) => Ok(root),
            // Another process created it first: use theirs.
            Err(_) if dir.join(VCEK_KEY_FILE).exists() => SimulatedRoot::load(dir),
            Err(e) => Err(e),
        }
    }

    /// Write this root to `dir`, which must not exist yet (or be empty): directory mode 0700,
    /// files 0600, created under a temporary name and renamed whole.
    pub fn save(&self, dir: &Path) -> Result<(), SimulatedError> {
        let root = self;
        let parent = dir.parent().unwrap_or(Path::new("."));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SimulatedError::Io { path, source }
        };
        fs::create_dir_all(parent).map_err(io(parent))?;
        let tmp = parent.join(format!(
            ".{}.tmp-{}-{:016x}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("simulated-snp"),
            std::process::id(),
            OsRng.next_u64()
        ));
        fs::DirBuilder::new().mode(0o700).create(&tmp).map_err(io(&tmp))?;
        let key = root.vcek_key_pkcs8()?;
        for (name, bytes) in [
            (ARK_FILE, &root.ark_der[..]),
            (VCEK_FILE, &root.vcek_der[..]),
            (VCEK_KEY_FILE, &key[..]),
        ] {
            let path = tmp.join(name);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io(&path))?;
            f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io(&path))?;
        }
        fs::rename(&tmp, dir).map_err(|source| {
            let _ = fs::remove_dir_all(&tmp);
            SimulatedError::Io { path: dir.to_path_buf(), source }
        })
    }

    /// Load an existing root and check that its files belong together.
    pub fn load(dir: &Path) -> Result<SimulatedRoot, SimulatedError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read(&path).map_err(|source| SimulatedError::Io { path, source })
        };
        let corrupt =
            |name: &str, reason: String| SimulatedError::Corrupt { path: dir.join(name), reason };
        let ark_der = read(ARK_FILE)?;
        let vcek_der = read(VCEK_FILE)?;
        let key_der = read(VCEK_KEY_FILE)?;
        let ark = Certificate::from_der(&ark_der).map_err(|e| corrupt(ARK_FILE, e.to_string()))?;
        let vcek =
            Certificate::from_der(&vcek_der).map_err(|e| corrupt(VCEK_FILE, e.to_string()))?;
        certs::verify_ecdsa_p384(&ark, &ark).map_err(|e| corrupt(ARK_FILE, e.0))?;
        certs::verify_ecdsa_p384(&ark, &vcek)
            .map_err(|e| corrupt(VCEK_FILE, format!("not signed by ark.der: {}", e.0)))?;
        let vcek_key = p384::ecdsa::SigningKey::from_pkcs8_der(&key_der)
            .map_err(|e| corrupt(VCEK_KEY_FILE, e.to_string()))?;
        certs::vek_public_key(&vcek).map_err(|e| corrupt(VCEK_FILE, e))?;
        if certs::spki_bits(&vcek) != vcek_key.verifying_key().to_encoded_point(false).as_bytes() {
            return Err(corrupt(VCEK_KEY_FILE, "does not match vcek.der".into()));
        }
        let exts = VekExtensions::read(&vcek).map_err(|e| corrupt(VCEK_FILE, e.to_string()))?;
        let chip_id: [u8; 64] = exts
            .hw_id
            .as_deref()
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| corrupt(VCEK_FILE, "no 64-byte hwID extension".into()))?;
        let spl =
            |v: Option<u8>| v.ok_or_else(|| corrupt(VCEK_FILE, "missing TCB extension".into()));
        let tcb = TcbVersion {
            fmc: None,
            bootloader: spl(exts.bootloader)?,
            tee: spl(exts.tee)?,
            snp: spl(exts.snp)?,
            microcode: spl(exts.microcode)?,
        };
        let key_id = Hex(certs::spki_sha256(&ark));
        Ok(SimulatedRoot {
            key_id,
            ark_der,
            vcek_der,
            vcek_key,
            platform: SimulatedPlatform { chip_id, tcb },
        })
    }

    /// The root's key id (SHA-256 of the ARK's SubjectPublicKeyInfo): what a policy names in
    /// `simulated_roots` to accept this host's simulated evidence.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }
    pub fn ark_der(&self) -> &[u8] {
        &self.ark_der
    }
    pub fn vcek_der(&self) -> &[u8] {
        &self.vcek_der
    }
    pub fn platform(&self) -> SimulatedPlatform {
        self.platform
    }
    /// The simulated VCEK's secret key (PKCS#8 DER), for the host to hand to its guest.
    pub fn vcek_key_pkcs8(&self) -> Result<Vec<u8>, SimulatedError> {
        Ok(self.vcek_key.to_pkcs8_der().map_err(SimulatedError::Key)?.as_bytes().to_vec())
    }
    /// An attester for one launch, signing with this root's VCEK.
    pub fn attester(&self, launch: SimulatedLaunch) -> SimulatedAttester {
        SimulatedAttester::with_key(self.vcek_key.clone(), self.platform, launch)
    }
    /// The evidence bundle for a report signed by this root (ARK → VCEK, no ASK).
    pub fn bundle(&self, report: Vec<u8>) -> EvidenceBundle {
        EvidenceBundle {
            report,
            vek: self.vcek_der.clone(),
            ask: None,
            ark: self.ark_der.clone(),
            provider: Some("simulated".into()),
        }
    }
    /// `policy` plus this root in `simulated_roots`.
    pub fn allowed_by(&self, mut policy: EvidencePolicy) -> EvidencePolicy {
        if !policy.simulated_roots.contains(&self.key_id()) {
            policy.simulated_roots.push(self.key_id());
        }
        policy
    }
}

/// The launch facts of one simulated guest (in a real SNP launch the firmware computes the
/// measurement and the host sets HOST_DATA, policy and VMPL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimulatedLaunch {
    pub measurement: [u8; 48],
    pub host_data: [u8; 32],
    pub policy: u64,
    pub vmpl: u32,
}

impl SimulatedLaunch {
    /// A launch with the default guest policy at VMPL 0.
    pub fn new(measurement: [u8; 48], host_data: [u8; 32]) -> SimulatedLaunch {
        SimulatedLaunch { measurement, host_data, policy: DEFAULT_GUEST_POLICY, vmpl: 0 }
    }
}

/// Signs simulated reports in the guest: the stand-in for the AMD secure processor.
pub struct SimulatedAttester {
    key: p384::ecdsa::SigningKey,
    platform: SimulatedPlatform,
    launch: SimulatedLaunch,
    report_id: [u8; 32],
}

impl std::fmt::Debug for SimulatedAttester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedAttester").field("launch", &self.launch).finish_non_exhaustive()
    }
}

impl SimulatedAttester {
    /// From the simulated VCEK's PKCS#8 key (as [`SimulatedRoot::vcek_key_pkcs8`] gives it).
    pub fn new(
        vcek_key_pkcs8: &[u8],
        platform: SimulatedPlatform,
        launch: SimulatedLaunch,
    ) -> Result<SimulatedAttester, SimulatedError> {
        let key =
            p384::ecdsa::SigningKey::from_pkcs8_der(vcek_key_pkcs8).map_err(SimulatedError::Key)?;
        Ok(SimulatedAttester::with_key(key, platform, launch))
    }

    fn with_key(
        key: p384::ecdsa::SigningKey,
        platform: SimulatedPlatform,
        launch: SimulatedLaunch,
    ) -> Self {
        let mut report_id = [0u8; 32];
        OsRng.fill_bytes(&mut report_id);
        SimulatedAttester { key, platform, launch, report_id }
    }

    /// A raw 1184-byte report binding `report_data`, signed by the simulated VCEK.
    pub fn report(&self, report_data: &[u8; 64]) -> Vec<u8> {
        let mut raw = vec![0u8; REPORT_LEN];
        let put = |raw: &mut Vec<u8>, off: usize, bytes: &[u8]| {
            raw[off..off + bytes.len()].copy_from_slice(bytes)
        };
        let tcb = self.platform.tcb.encode(TcbLayout::MilanGenoa);
        put(&mut raw, offset::VERSION, &5u32.to_le_bytes());
        put(&mut raw, offset::POLICY, &self.launch.policy.to_le_bytes());
        put(&mut raw, offset::VMPL, &self.launch.vmpl.to_le_bytes());
        put(&mut raw, offset::SIG_ALGO, &1u32.to_le_bytes());
        for off in
            [offset::CURRENT_TCB, offset::REPORTED_TCB, offset::COMMITTED_TCB, offset::LAUNCH_TCB]
        {
            put(&mut raw, off, &tcb);
        }
        put(&mut raw, offset::REPORT_DATA, report_data);
        put(&mut raw, offset::MEASUREMENT, &self.launch.measurement);
        put(&mut raw, offset::HOST_DATA, &self.launch.host_data);
        put(&mut raw, offset::REPORT_ID, &self.report_id);
        put(&mut raw, offset::REPORT_ID_MA, &[0xFF; 32]);
        put(&mut raw, offset::CHIP_ID, &self.platform.chip_id);
        self.sign_raw(&mut raw);
        raw
    }

    /// (Re)sign raw report bytes in place: ECDSA P-384 over SHA-384 of bytes 0x000..0x2A0,
    /// r and s written little-endian into their 72-byte fields. Tests use it to make
    /// correctly signed reports with any field changed.
    pub fn sign_raw(&self, raw: &mut [u8]) {
        assert_eq!(raw.len(), REPORT_LEN, "an SNP report is 1184 bytes");
        let digest = Sha384::digest(&raw[..SIGNED_LEN]);
        let sig: p384::ecdsa::Signature =
            self.key.sign_prehash(&digest).expect("P-384 signs a 48-byte prehash");
        let bytes = sig.to_bytes();
        raw[offset::SIGNATURE_R..offset::SIGNATURE_R + 72].fill(0);
        raw[offset::SIGNATURE_S..offset::SIGNATURE_S + 72].fill(0);
        for i in 0..48 {
            raw[offset::SIGNATURE_R + i] = bytes[47 - i];
            raw[offset::SIGNATURE_S + i] = bytes[95 - i];
        }
    }
}

#[cfg(feature = "producer")]
fn vcek_extensions(platform: &SimulatedPlatform) -> Result<Vec<Extension>, SimulatedError> {
    let ext = |id: &str, value: Vec<u8>| -> Result<Extension, SimulatedError> {
        Ok(Extension {
            extn_id: ObjectIdentifier::new_unwrap(id),
            critical: false,
            extn_value: OctetString::new(value).map_err(SimulatedError::Certificate)?,
        })
    };
    let int = |v: u8| v.to_der().map_err(SimulatedError::Certificate);
    let name = Ia5StringRef::new(SIMULATED_PRODUCT)
        .and_then(|s| s.to_der())
        .map_err(SimulatedError::Certificate)?;
    let t = platform.tcb;
    Ok(vec![
        ext(oid::PRODUCT_NAME, name)?,
        ext(oid::BL_SPL, int(t.bootloader)?)?,
        ext(oid::TEE_SPL, int(t.tee)?)?,
        ext(oid::SNP_SPL, int(t.snp)?)?,
        ext(oid::UCODE_SPL, int(t.microcode)?)?,
        ext(oid::HW_ID, platform.chip_id.to_vec())?,
    ])
}

#[cfg(feature = "producer")]
/// An X.509 time: UTCTime before 2050, GeneralizedTime from then on (RFC 5280, 4.1.2.5).
fn x509_time(t: SystemTime) -> Result<Time, SimulatedError> {
    let dt = der::DateTime::from_system_time(t).map_err(SimulatedError::Certificate)?;
    Ok(if dt.year() < 2050 {
        Time::UtcTime(der::asn1::UtcTime::from_date_time(dt).map_err(SimulatedError::Certificate)?)
    } else {
        Time::GeneralTime(der::asn1::GeneralizedTime::from_date_time(dt))
    })
}

#[cfg(feature = "producer")]
/// An X.509 v3 certificate signed with ECDSA P-384/SHA-384.
fn issue(
    issuer_key: &p384::ecdsa::SigningKey,
    issuer: &Name,
    subject: &Name,
    subject_key: &p384::ecdsa::VerifyingKey,
    extensions: Vec<Extension>,
    validity: Validity,
) -> Result<Certificate, SimulatedError> {
    let algorithm = AlgorithmIdentifierOwned { oid: certs::ECDSA_WITH_SHA384, parameters: None };
    let spki_der = subject_key.to_public_key_der().map_err(|e| SimulatedError::Key(e.into()))?;
    let spki = SubjectPublicKeyInfoOwned::from_der(spki_der.as_bytes())
        .map_err(SimulatedError::Certificate)?;
    let mut serial = [0u8; 16];
    OsRng.fill_bytes(&mut serial);
    serial[0] &= 0x7F;
    serial[0] |= 0x01;
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: SerialNumber::new(&serial).map_err(SimulatedError::Certificate)?,
        signature: algorithm.clone(),
        issuer: issuer.clone(),
        validity,
        subject: subject.clone(),
        subject_public_key_info: spki,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions),
    };
    let tbs_der = tbs.to_der().map_err(SimulatedError::Certificate)?;
    let sig: p384::ecdsa::DerSignature = issuer_key.sign(&tbs_der);
    Ok(Certificate {
        tbs_certificate: tbs,
        signature_algorithm: algorithm,
        signature: BitString::from_bytes(sig.as_bytes()).map_err(SimulatedError::Certificate)?,
    })
}
