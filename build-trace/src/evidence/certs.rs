//! Certificates of SNP evidence: loading (DER or PEM), AMD's pinned roots and built-in
//! intermediates, the AMD VCEK/VLEK extensions, certificate signatures and validity periods.
//!
//! What is here: small functions over `x509_cert::Certificate`. RSA-PSS/SHA-384 signatures (AMD's
//! ARK → ASK/ASVK → VCEK/VLEK) are checked with the `sev` crate; ECDSA P-384/SHA-384 signatures
//! (the simulated root) with `p384`.
//!
//! What is not here: deciding what a chain is worth (that is [`super::verify`]). AMD VCEKs have
//! serial number 0 and no key identifiers, so no general X.509 path builder is used: each
//! signature is checked "by hand" over the DER of the signee's `tbsCertificate`.

use std::time::SystemTime;

use aws_lc_rs::signature;
use der::{Decode, DecodePem, Encode};
use sha2::{Digest, Sha256};
use x509_cert::Certificate;

use super::error::{CertRole, EvidenceError, SignatureError};
use super::report::Product;

/// `ecdsa-with-SHA384`.
pub const ECDSA_WITH_SHA384: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
/// `RSASSA-PSS`.
pub const RSA_PSS: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
/// `id-ecPublicKey`.
const EC_PUBLIC_KEY: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `secp384r1` (NIST P-384).
const SECP384R1: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.3.132.0.34");
const COMMON_NAME: der::asn1::ObjectIdentifier = der::asn1::ObjectIdentifier::new_unwrap("2.5.4.3");

/// AMD's VCEK/VLEK extensions (OID arc 1.3.6.1.4.1.3704.1, VCEK spec 57230 §3).
pub mod oid {
    pub const PRODUCT_NAME: &str = "1.3.6.1.4.1.3704.1.2";
    pub const BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
    pub const TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
    pub const SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
    pub const UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
    pub const FMC_SPL: &str = "1.3.6.1.4.1.3704.1.3.9";
    pub const HW_ID: &str = "1.3.6.1.4.1.3704.1.4";
    pub const CSP_ID: &str = "1.3.6.1.4.1.3704.1.5";
}

/// SHA-256 of the SubjectPublicKeyInfo DER of each AMD root key (ARK), as listed in the test
/// vectors' `test-support/data/snp/README.md` (a test recomputes them from the `sev` crate's
/// built-in ARKs).
pub const AMD_ROOT_PINS: [(Product, &str); 3] = [
    (Product::Milan, "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9"),
    (Product::Genoa, "429a69c9422aa258ee4d8db5fcda9c6470ef15f8cd5a9cebd6cbc7d90b863831"),
    (Product::Turin, "4f125410563a2ab9a50356f9243f6fe0b6f73de98603f53f90339c70e9d7ad08"),
];

/// The AMD product whose pinned ARK key has this SPKI SHA-256.
pub fn pinned_amd_root(spki_sha256: &[u8; 32]) -> Option<Product> {
    let hex = hex::encode(spki_sha256);
    AMD_ROOT_PINS.iter().find(|(_, pin)| *pin == hex).map(|(p, _)| *p)
}

/// AMD's ARK of a product (DER), as compiled into the `sev` crate.
pub fn builtin_ark(product: Product) -> Vec<u8> {
    pem_to_der(match product {
        Product::Milan => sev::certs::snp::builtin::milan::ARK,
        Product::Genoa => sev::certs::snp::builtin::genoa::ARK,
        Product::Turin => sev::certs::snp::builtin::turin::ARK,
    })
}

/// AMD's ASK (the VCEK intermediate) of a product (DER).
pub fn builtin_ask(product: Product) -> Vec<u8> {
    pem_to_der(match product {
        Product::Milan => sev::certs::snp::builtin::milan::ASK,
        Product::Genoa => sev::certs::snp::builtin::genoa::ASK,
        Product::Turin => sev::certs::snp::builtin::turin::ASK,
    })
}

/// AMD's ASVK (the VLEK intermediate, `SEV-VLEK-<product>`) of a product (DER), from KDS
/// `vlek/v1/<product>/cert_chain` (copied from go-sev-guest's `verify/trust`).
pub fn builtin_asvk(product: Product) -> Vec<u8> {
    pem_to_der(match product {
        Product::Milan => include_bytes!("amd/milan_asvk.pem"),
        Product::Genoa => include_bytes!("amd/genoa_asvk.pem"),
        Product::Turin => include_bytes!("amd/turin_asvk.pem"),
    })
}

fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    // The built-in PEMs are fixed data; a test parses every one of them.
    Certificate::from_pem(pem).and_then(|c| c.to_der()).unwrap_or_default()
}

/// Certificates from a file's bytes: one DER certificate, or any number of PEM certificates.
/// Returns DER encodings in file order.
pub fn load_certificates(bytes: &[u8]) -> Result<Vec<Vec<u8>>, der::Error> {
    if !bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        from_der(bytes)?;
        return Ok(vec![bytes.to_vec()]);
    }
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = bytes.trim_ascii();
    while !rest.is_empty() {
        let end = rest.windows(END.len()).position(|w| w == END).map(|i| i + END.len());
        let (block, tail) = rest.split_at(end.unwrap_or(rest.len()));
        let (label, der) = der::pem::decode_vec(block)?;
        if label != "CERTIFICATE" {
            return Err(der::pem::Error::Label.into());
        }
        from_der(&der)?;
        out.push(der);
        rest = tail.trim_ascii();
    }
    Ok(out)
}

/// A certificate from DER, after [`check_der_lengths`].
pub fn from_der(der_bytes: &[u8]) -> Result<Certificate, der::Error> {
    check_der_lengths(der_bytes)?;
    Certificate::from_der(der_bytes)
}

/// Every TLV of `bytes` (and of the constructed values inside) fits in what holds it. `der`
/// 0.7 allocates an owned value's declared length before reading it (`Reader::read_vec`), so
/// without this a 1 KiB certificate could make it allocate up to 256 MiB (the most `der` reads as a length) (found by the
/// `vek_cert` fuzz target). Call it before decoding untrusted bytes into owned `der` types.
pub fn check_der_lengths(bytes: &[u8]) -> Result<(), der::Error> {
    use der::Reader as _;
    fn walk(mut b: &[u8], mut at: usize, depth: usize) -> Result<(), der::Error> {
        let pos = |n: usize| der::Length::try_from(n).unwrap_or(der::Length::MAX);
        while !b.is_empty() {
            if depth > 32 {
                return Err(der::Error::new(der::ErrorKind::Overlength, pos(at)));
            }
            let mut r = der::SliceReader::new(b)?;
            let header = der::Header::decode(&mut r)?;
            let head = usize::try_from(r.position())?;
            let len = usize::try_from(header.length)?;
            if len > b.len() - head {
                let actual_len = pos(b.len() - head);
                let kind = der::ErrorKind::Incomplete { expected_len: header.length, actual_len };
                return Err(der::Error::new(kind, pos(at)));
            }
            let (content, tail) = b[head..].split_at(len);
            if header.tag.is_constructed() {
                walk(content, at + head, depth + 1)?;
            }
            (b, at) = (tail, at + head + len);
        }
        Ok(())
    }
    walk(bytes, 0, 0)
}

/// A DER certificate whose issuer equals its subject (a root, such as an ARK).
pub fn is_self_issued(der_bytes: &[u8]) -> bool {
    from_der(der_bytes)
        .map(|c| c.tbs_certificate.issuer == c.tbs_certificate.subject)
        .unwrap_or(false)
}

/// `parent`'s subject is `child`'s issuer (both DER). Picks the intermediate of a leaf from a
/// bundle holding both an ASK and an ASVK.
pub fn names_issuer_of(parent: &[u8], child: &[u8]) -> bool {
    match (from_der(parent), from_der(child)) {
        (Ok(p), Ok(c)) => p.tbs_certificate.subject == c.tbs_certificate.issuer,
        _ => false,
    }
}

/// Parse one DER certificate of the chain.
pub fn parse(role: CertRole, der_bytes: &[u8]) -> Result<Certificate, EvidenceError> {
    from_der(der_bytes).map_err(|source| EvidenceError::CertificateParse { role, source })
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo (DER): the key id of roots and VLEKs.
pub fn spki_sha256(cert: &Certificate) -> [u8; 32] {
    let spki = cert.tbs_certificate.subject_public_key_info.to_der().unwrap_or_default();
    Sha256::digest(spki).into()
}

/// The subject's common name (CN), or the whole subject when it has none.
pub fn subject_cn(cert: &Certificate) -> String {
    for rdn in cert.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid == COMMON_NAME {
                if let Some(s) = directory_string(&atv.value) {
                    return s;
                }
            }
        }
    }
    cert.tbs_certificate.subject.to_string()
}

fn directory_string(value: &der::Any) -> Option<String> {
    use der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
    if let Ok(s) = value.decode_as::<Utf8StringRef<'_>>() {
        return Some(s.as_str().to_string());
    }
    if let Ok(s) = value.decode_as::<PrintableStringRef<'_>>() {
        return Some(s.as_str().to_string());
    }
    value.decode_as::<Ia5StringRef<'_>>().ok().map(|s| s.as_str().to_string())
}

/// RSA-PSS/SHA-384 signature of `signee` under `signer`'s key (AMD's chain: RSA-4096, MGF1
/// SHA-384, salt length 48), with aws-lc-rs.
pub fn verify_rsa_pss(signer: &Certificate, signee: &Certificate) -> Result<(), SignatureError> {
    if signee.signature_algorithm.oid != RSA_PSS {
        return Err(SignatureError(format!(
            "signature algorithm {} is not RSASSA-PSS",
            signee.signature_algorithm.oid
        )));
    }
    // The subjectPublicKey BIT STRING of an RSA key holds its PKCS#1 RSAPublicKey, whichever
    // algorithm identifier (rsaEncryption or RSASSA-PSS) the SubjectPublicKeyInfo names.
    let key =
        signature::ParsedPublicKey::new(&signature::RSA_PSS_2048_8192_SHA384, spki_bits(signer))
            .map_err(|e| {
                SignatureError(format!("the issuer's key is not a usable RSA key: {e}"))
            })?;
    verify_tbs(&key, signee, "RSA-PSS")
}

/// ECDSA P-384/SHA-384 signature of `signee` under `signer`'s key (the simulated chain).
pub fn verify_ecdsa_p384(signer: &Certificate, signee: &Certificate) -> Result<(), SignatureError> {
    if signee.signature_algorithm.oid != ECDSA_WITH_SHA384 {
        return Err(SignatureError(format!(
            "signature algorithm {} is not ecdsa-with-SHA384",
            signee.signature_algorithm.oid
        )));
    }
    let key = p384_key(signer, &signature::ECDSA_P384_SHA384_ASN1).map_err(SignatureError)?;
    verify_tbs(&key, signee, "ECDSA P-384")
}

/// `signee`'s signature over the DER of its `tbsCertificate`.
fn verify_tbs(
    key: &signature::ParsedPublicKey,
    signee: &Certificate,
    what: &str,
) -> Result<(), SignatureError> {
    let tbs = signee
        .tbs_certificate
        .to_der()
        .map_err(|e| SignatureError(format!("tbsCertificate does not encode: {e}")))?;
    key.verify_sig(&tbs, signee.signature.raw_bytes())
        .map_err(|_| SignatureError(format!("{what} signature does not verify")))
}

/// The P-384 public key of a VCEK/VLEK (or simulated ARK), parsed once for verifying report
/// signatures: ECDSA P-384/SHA-384 with r and s as fixed-width big-endian integers (`r || s`).
pub fn vek_public_key(cert: &Certificate) -> Result<signature::ParsedPublicKey, String> {
    p384_key(cert, &signature::ECDSA_P384_SHA384_FIXED)
}

/// A certificate's key as an uncompressed SEC1 point on P-384 (aws-lc checks the point is on
/// the curve and not the identity).
fn p384_key(
    cert: &Certificate,
    alg: &'static signature::EcdsaVerificationAlgorithm,
) -> Result<signature::ParsedPublicKey, String> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.decode_as().ok());
    let bits = spki_bits(cert);
    if spki.algorithm.oid != EC_PUBLIC_KEY
        || curve != Some(SECP384R1)
        || bits.len() != 97
        || bits[0] != 0x04
    {
        return Err("the certificate's key is not an uncompressed ECDSA P-384 public key".into());
    }
    signature::ParsedPublicKey::new(alg, bits)
        .map_err(|e| format!("the certificate's key is not a point on P-384: {e}"))
}

/// The subjectPublicKey bits of a certificate.
pub fn spki_bits(cert: &Certificate) -> &[u8] {
    cert.tbs_certificate.subject_public_key_info.subject_public_key.raw_bytes()
}

/// `(not_before, not_after)`.
pub fn validity(cert: &Certificate) -> (SystemTime, SystemTime) {
    let v = &cert.tbs_certificate.validity;
    (v.not_before.to_system_time(), v.not_after.to_system_time())
}

/// The AMD extensions of a VCEK/VLEK that the verifier binds to the report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VekExtensions {
    pub product_name: Option<String>,
    pub bootloader: Option<u8>,
    pub tee: Option<u8>,
    pub snp: Option<u8>,
    pub microcode: Option<u8>,
    pub fmc: Option<u8>,
    /// hwID: 64 bytes (Milan/Genoa) or 8 bytes (Turin). VCEK only.
    pub hw_id: Option<Vec<u8>>,
    /// CSP ID (VLEK only), e.g. "CN=cc-us-east-2.amazonaws.com".
    pub csp_id: Option<String>,
}

impl VekExtensions {
    pub fn read(cert: &Certificate) -> Result<VekExtensions, EvidenceError> {
        let mut out = VekExtensions::default();
        let Some(exts) = &cert.tbs_certificate.extensions else { return Ok(out) };
        for ext in exts {
            let value = ext.extn_value.as_bytes();
            let id = ext.extn_id.to_string();
            let bad = |oid: &'static str, problem: &str| EvidenceError::CertificateExtension {
                role: CertRole::Vek,
                oid,
                problem: problem.to_string(),
            };
            let spl = |oid: &'static str| -> Result<Option<u8>, EvidenceError> {
                u8::from_der(value).map(Some).map_err(|_| bad(oid, "not a DER INTEGER in 0..=255"))
            };
            match id.as_str() {
                oid::PRODUCT_NAME => {
                    out.product_name = Some(
                        der::asn1::Ia5StringRef::from_der(value)
                            .map(|s| s.as_str().to_string())
                            .map_err(|_| bad(oid::PRODUCT_NAME, "not an IA5String"))?,
                    )
                }
                oid::BL_SPL => out.bootloader = spl(oid::BL_SPL)?,
                oid::TEE_SPL => out.tee = spl(oid::TEE_SPL)?,
                oid::SNP_SPL => out.snp = spl(oid::SNP_SPL)?,
                oid::UCODE_SPL => out.microcode = spl(oid::UCODE_SPL)?,
                oid::FMC_SPL => out.fmc = spl(oid::FMC_SPL)?,
                oid::HW_ID => out.hw_id = Some(hw_id_bytes(value)),
                oid::CSP_ID => {
                    out.csp_id = Some(
                        directory_string(
                            &check_der_lengths(value)
                                .and_then(|()| der::Any::from_der(value))
                                .map_err(|_| bad(oid::CSP_ID, "not DER"))?,
                        )
                        .unwrap_or_else(|| hex::encode(value)),
                    )
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

/// AMD writes the hwID as the raw chip id (64 or 8 bytes). Some tools wrap it in a DER OCTET
/// STRING; accept that too (the lengths make the two encodings unambiguous).
fn hw_id_bytes(value: &[u8]) -> Vec<u8> {
    match value {
        [0x04, len, rest @ ..] if (*len == 64 || *len == 8) && rest.len() == *len as usize => {
            rest.to_vec()
        }
        _ => value.to_vec(),
    }
}

/// RFC 3339 form of a time (`2025-06-01T00:00:00Z`).
pub fn fmt_time(t: SystemTime) -> String {
    der::DateTime::from_system_time(t).map(|d| d.to_string()).unwrap_or_else(|_| format!("{t:?}"))
}

/// Parse `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    let full = if s.len() == 10 { format!("{s}T00:00:00Z") } else { s.to_string() };
    full.parse::<der::DateTime>()
        .map(|d| d.to_system_time())
        .map_err(|_| format!("{s:?} is not a UTC time like 2025-06-01 or 2025-06-01T12:00:00Z"))
}
