//! This host's AMD certificates: checking what the KDS (or an operator's directory, or a
//! guest's certificate table) handed us, and the on-disk cache the launcher reads.
//!
//! Cache layout, under `<state>/snp/certs/` ([`CertCache`]):
//! - `<Product>/cert_chain.pem`: the product's ASK then ARK, as the KDS serves it;
//! - `<Product>/<hwID hex>/<tcb>/vcek.der`, `<tcb>` like `bl03-tee00-snp08-ucode115` (Turin:
//!   `fmc01-bl01-…`): one VCEK per chip and reported TCB, the key the KDS uses.
//!
//! A file enters the cache only after [`check_vcek`] (or [`check_chain`]) accepted it, and the
//! evidence verifier checks it again on every use against AMD's pinned roots: a tampered cache
//! can make builds fail, never pass.
//!
//! [`check_vcek`], in order: DER parses; valid at the given time (an expired certificate is
//! useless whatever else holds); `productName` names a known product (the expected one, when
//! given); it is a VCEK (a hwID extension; a VLEK has none); its signature verifies under the
//! product's ASK, which AMD's pinned ARK signed; hwID and the TCB extensions equal the
//! expected chip and reported TCB, when given.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use build_trace::evidence::certs::{self as amd, VekExtensions};
use build_trace::evidence::report::{Product, TcbVersion};
use build_trace::evidence::CertRole;
use x509_cert::Certificate;

use super::platform::HostIdentity;

/// Why a certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Not a certificate.
    #[error("not an X.509 certificate")]
    Parse(#[source] build_trace::evidence::EvidenceError),
    /// Past its validity.
    #[error("the certificate expired on {0}")]
    Expired(String),
    /// Before its validity.
    #[error("the certificate is not valid before {0}")]
    NotYetValid(String),
    /// No or an unknown product name.
    #[error("the certificate names product {0:?}, not Milan, Genoa or Turin")]
    UnknownProduct(String),
    /// Another product than expected.
    #[error("the certificate is for {cert}, this host is {expected}")]
    WrongProduct {
        /// In the certificate.
        cert: Product,
        /// Expected.
        expected: Product,
    },
    /// A VLEK (or something else without a hwID).
    #[error("not a VCEK: it has no hwID extension (a VLEK? VLEKs come from the cloud provider, not the KDS)")]
    NotVcek,
    /// Signature.
    #[error("the {what} is not signed by AMD's {product} {signer}: {reason}")]
    Signature {
        /// What.
        what: &'static str,
        /// Signer.
        signer: &'static str,
        /// Product.
        product: Product,
        /// Why.
        reason: String,
    },
    /// Another chip.
    #[error("the VCEK is for chip {cert}…, this host's chip is {expected}…")]
    WrongChip {
        /// In the certificate (first 8 bytes, hex).
        cert: String,
        /// Expected.
        expected: String,
    },
    /// Another TCB.
    #[error("the VCEK is for TCB {cert}, the reported TCB is {expected}")]
    WrongTcb {
        /// In the certificate.
        cert: String,
        /// Expected.
        expected: String,
    },
    /// A bad extension.
    #[error("AMD extension")]
    Extension(#[source] build_trace::evidence::EvidenceError),
    /// The chain is not ASK then ARK, or its root is not pinned.
    #[error("the {0} certificate chain is not AMD's: {1}")]
    Chain(Product, String),
}

fn short(id: &[u8]) -> String {
    hex::encode(&id[..id.len().min(8)])
}

/// Validity of `cert` at `now`.
fn check_time(cert: &Certificate, now: SystemTime) -> Result<(), CertError> {
    let (not_before, not_after) = amd::validity(cert);
    if now > not_after {
        return Err(CertError::Expired(amd::fmt_time(not_after)));
    }
    if now < not_before {
        return Err(CertError::NotYetValid(amd::fmt_time(not_before)));
    }
    Ok(())
}

/// Check a VCEK (DER) under the rules of the module doc; returns the identity it is for.
pub fn check_vcek(
    der: &[u8],
    expected: Option<&HostIdentity>,
    now: SystemTime,
) -> Result<HostIdentity, CertError> {
    let cert = amd::parse(CertRole::Vek, der).map_err(CertError::Parse)?;
    check_time(&cert, now)?;
    let ext = VekExtensions::read(&cert).map_err(CertError::Extension)?;
    let name = ext.product_name.clone().unwrap_or_default();
    let product = Product::from_cert_name(&name).ok_or(CertError::UnknownProduct(name))?;
    if let Some(e) = expected {
        if e.product != product {
            return Err(CertError::WrongProduct { cert: product, expected: e.product });
        }
    }
    let hw_id = ext.hw_id.clone().ok_or(CertError::NotVcek)?;
    let ask = amd::parse(CertRole::Ask, &amd::builtin_ask(product)).map_err(CertError::Parse)?;
    amd::verify_rsa_pss(&ask, &cert).map_err(|e| CertError::Signature {
        what: "VCEK",
        signer: "ASK",
        product,
        reason: e.0,
    })?;
    let tcb = TcbVersion {
        fmc: if product == Product::Turin { ext.fmc.or(Some(0)) } else { None },
        bootloader: ext.bootloader.unwrap_or(0),
        tee: ext.tee.unwrap_or(0),
        snp: ext.snp.unwrap_or(0),
        microcode: ext.microcode.unwrap_or(0),
    };
    let mut chip_id = hw_id.clone();
    chip_id.resize(64, 0);
    let got = HostIdentity { product, chip_id, tcb };
    if let Some(e) = expected {
        if got.hw_id() != e.hw_id() {
            return Err(CertError::WrongChip { cert: short(&hw_id), expected: short(e.hw_id()) });
        }
        if got.tcb != e.tcb {
            return Err(CertError::WrongTcb {
                cert: got.tcb.to_string(),
                expected: e.tcb.to_string(),
            });
        }
    }
    Ok(got)
}

/// Check a KDS `cert_chain` (PEM: ASK, then ARK) of `product`: the ARK is AMD's pinned root
/// for that product and signed the ASK; both valid at `now`. Returns `(ask, ark)` DER.
pub fn check_chain(
    product: Product,
    pem: &[u8],
    now: SystemTime,
) -> Result<(Vec<u8>, Vec<u8>), CertError> {
    let bad = |m: String| CertError::Chain(product, m);
    let certs = amd::load_certificates(pem).map_err(|e| bad(e.to_string()))?;
    let [ask, ark] = <[Vec<u8>; 2]>::try_from(certs)
        .map_err(|c| bad(format!("{} certificates, expected the ASK and the ARK", c.len())))?;
    let ask_c = amd::parse(CertRole::Ask, &ask).map_err(CertError::Parse)?;
    let ark_c = amd::parse(CertRole::Ark, &ark).map_err(CertError::Parse)?;
    match amd::pinned_amd_root(&amd::spki_sha256(&ark_c)) {
        Some(p) if p == product => {}
        Some(p) => return Err(bad(format!("its root is {p}'s ARK"))),
        None => return Err(bad("its root is not one of AMD's pinned ARKs".into())),
    }
    check_time(&ark_c, now)?;
    check_time(&ask_c, now)?;
    amd::verify_rsa_pss(&ark_c, &ask_c).map_err(|e| CertError::Signature {
        what: "ASK",
        signer: "ARK",
        product,
        reason: e.0,
    })?;
    Ok((ask, ark))
}

/// The cache directory name of a TCB.
pub fn tcb_key(tcb: &TcbVersion) -> String {
    let fmc = tcb.fmc.map(|f| format!("fmc{f:02}-")).unwrap_or_default();
    format!(
        "{fmc}bl{:02}-tee{:02}-snp{:02}-ucode{:02}",
        tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode
    )
}

/// The certificate cache of a state directory (layout in the module doc).
#[derive(Debug, Clone)]
pub struct CertCache {
    root: PathBuf,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    io::Write::write_all(&mut tmp, bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

impl CertCache {
    /// The cache of `state_dir`.
    pub fn new(state_dir: &Path) -> CertCache {
        CertCache { root: state_dir.join("snp").join("certs") }
    }

    /// Its directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the VCEK of `id` lives.
    pub fn vcek_file(&self, id: &HostIdentity) -> PathBuf {
        self.root
            .join(id.product.name())
            .join(hex::encode(id.hw_id()))
            .join(tcb_key(&id.tcb))
            .join("vcek.der")
    }

    /// Where the chain of `product` lives.
    pub fn chain_file(&self, product: Product) -> PathBuf {
        self.root.join(product.name()).join("cert_chain.pem")
    }

    /// The cached VCEK of `id`, if any.
    pub fn lookup(&self, id: &HostIdentity) -> Option<Vec<u8>> {
        fs::read(self.vcek_file(id)).ok()
    }

    /// Store a checked VCEK.
    pub fn store_vcek(&self, id: &HostIdentity, der: &[u8]) -> io::Result<PathBuf> {
        let path = self.vcek_file(id);
        write_atomic(&path, der)?;
        Ok(path)
    }

    /// Store a checked chain.
    pub fn store_chain(&self, product: Product, pem: &[u8]) -> io::Result<PathBuf> {
        let path = self.chain_file(product);
        write_atomic(&path, pem)?;
        Ok(path)
    }

    /// Every cached VCEK file.
    pub fn vceks(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut todo = vec![self.root.clone()];
        while let Some(d) = todo.pop() {
            let Ok(entries) = fs::read_dir(&d) else { continue };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else if p.file_name().is_some_and(|n| n == "vcek.der") {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }
}

/// What an import of one file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    /// A VCEK, stored for this identity at this path.
    Vcek(HostIdentity, PathBuf),
    /// A product's ASK and ARK, stored.
    Chain(Product, PathBuf),
    /// A certificate that is not needed (a lone ARK or ASK, already built in).
    Known(String),
}

/// Import every certificate of the files in `dir` (DER, or PEM with any number of
/// certificates): each VCEK is checked and filed under the chip and TCB its own extensions
/// name; a two-certificate PEM that is a product's KDS chain is checked and stored. Anything
/// that fails a check is an error naming the file.
pub fn import_dir(
    cache: &CertCache,
    dir: &Path,
    now: SystemTime,
) -> Result<Vec<Imported>, (PathBuf, String)> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| (dir.to_owned(), e.to_string()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let fail = |m: String| (f.clone(), m);
        let bytes = fs::read(&f).map_err(|e| fail(e.to_string()))?;
        let certs = amd::load_certificates(&bytes)
            .map_err(|e| fail(format!("not a certificate file: {e}")))?;
        if certs.len() == 2 && amd::is_self_issued(&certs[1]) {
            let ark = amd::parse(CertRole::Ark, &certs[1]).map_err(|e| fail(e.to_string()))?;
            let product = amd::pinned_amd_root(&amd::spki_sha256(&ark))
                .ok_or_else(|| fail("a chain whose root is not one of AMD's pinned ARKs".into()))?;
            check_chain(product, &bytes, now).map_err(|e| fail(build_trace::error_chain(&e)))?;
            let path = cache.store_chain(product, &bytes).map_err(|e| fail(e.to_string()))?;
            out.push(Imported::Chain(product, path));
            continue;
        }
        for der in certs {
            let cert = amd::parse(CertRole::Vek, &der).map_err(|e| fail(e.to_string()))?;
            let cn = amd::subject_cn(&cert);
            if cn != "SEV-VCEK" {
                out.push(Imported::Known(format!("{cn} ({})", f.display())));
                continue;
            }
            let id = check_vcek(&der, None, now).map_err(|e| fail(build_trace::error_chain(&e)))?;
            let path = cache.store_vcek(&id, &der).map_err(|e| fail(e.to_string()))?;
            out.push(Imported::Vcek(id, path));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MILAN_REPORT: &[u8] = include_bytes!("../../tests/data/snp/report_milan.bin");
    const MILAN_VCEK: &[u8] = include_bytes!("../../tests/data/snp/vcek_milan.der");
    const OTHER_MILAN_VCEK: &[u8] = include_bytes!("../../tests/data/snp/test-vcek.der");
    const TURIN_REPORT: &[u8] = include_bytes!("../../tests/data/snp/turin_attestation_report.bin");
    const TURIN_VCEK: &[u8] = include_bytes!("../../tests/data/snp/turin_vcek.pem");
    const VLEK: &[u8] = include_bytes!("../../tests/data/snp/test-vlek.der");
    const MILAN_CHAIN: &[u8] = include_bytes!("../../tests/data/snp/cert_chain_milan");

    fn at(s: &str) -> SystemTime {
        amd::parse_time(s).unwrap()
    }

    fn milan() -> HostIdentity {
        HostIdentity::from_report(MILAN_REPORT, Some(Product::Milan)).unwrap()
    }

    #[test]
    fn real_vceks_match_their_reports() {
        let now = at("2026-12-01");
        assert_eq!(check_vcek(MILAN_VCEK, Some(&milan()), now).unwrap(), milan());
        let turin = HostIdentity::from_report(TURIN_REPORT, None).unwrap();
        let der = amd::load_certificates(TURIN_VCEK).unwrap().remove(0);
        let got = check_vcek(&der, Some(&turin), now).unwrap();
        assert_eq!((got.hw_id(), got.tcb), (turin.hw_id(), turin.tcb));
    }

    #[test]
    fn each_mismatch_is_named() {
        let now = at("2026-12-01");
        let e = check_vcek(OTHER_MILAN_VCEK, Some(&milan()), now).unwrap_err();
        assert!(matches!(e, CertError::WrongChip { .. }), "{e}");
        let mut other_tcb = milan();
        other_tcb.tcb.snp += 1;
        let e = check_vcek(MILAN_VCEK, Some(&other_tcb), now).unwrap_err();
        assert!(matches!(e, CertError::WrongTcb { .. }), "{e}");
        let mut genoa = milan();
        genoa.product = Product::Genoa;
        let e = check_vcek(MILAN_VCEK, Some(&genoa), now).unwrap_err();
        assert!(matches!(e, CertError::WrongProduct { .. }), "{e}");
        // Valid 2023-04-03 .. 2030-04-03.
        let e = check_vcek(MILAN_VCEK, None, at("2031-01-01")).unwrap_err();
        assert_eq!(e.to_string(), "the certificate expired on 2030-04-03T19:23:43Z");
        assert!(matches!(
            check_vcek(MILAN_VCEK, None, at("2020-01-01")),
            Err(CertError::NotYetValid(_))
        ));
        // The real VLEK expired on 2025-12-10; inside its validity it is still not a VCEK.
        assert!(matches!(check_vcek(VLEK, None, now), Err(CertError::Expired(_))));
        assert!(matches!(check_vcek(VLEK, None, at("2025-06-01")), Err(CertError::NotVcek)));
        // A flipped bit in the signed part breaks the ASK's signature.
        let mut bad = MILAN_VCEK.to_vec();
        bad[300] ^= 1;
        assert!(check_vcek(&bad, None, now).is_err());
        assert!(matches!(check_vcek(b"junk", None, now), Err(CertError::Parse(_))));
    }

    #[test]
    fn chains_must_be_the_products_own() {
        let now = at("2026-12-01");
        let (ask, ark) = check_chain(Product::Milan, MILAN_CHAIN, now).unwrap();
        assert_eq!(
            (ask, ark),
            (amd::builtin_ask(Product::Milan), amd::builtin_ark(Product::Milan))
        );
        let e = check_chain(Product::Turin, MILAN_CHAIN, now).unwrap_err();
        assert!(e.to_string().contains("its root is Milan's ARK"), "{e}");
        let e = check_chain(Product::Milan, TURIN_VCEK, now).unwrap_err();
        assert!(e.to_string().contains("1 certificates"), "{e}");
    }

    #[test]
    fn cache_layout_and_import() {
        let t = tempfile::tempdir().unwrap();
        let cache = CertCache::new(t.path());
        let id = milan();
        assert!(cache.lookup(&id).is_none());
        let p = cache.store_vcek(&id, MILAN_VCEK).unwrap();
        assert!(p.ends_with("bl03-tee00-snp08-ucode115/vcek.der"), "{}", p.display());
        assert!(p.starts_with(t.path().join("snp/certs/Milan")));
        assert_eq!(cache.lookup(&id).unwrap(), MILAN_VCEK);

        let from = tempfile::tempdir().unwrap();
        fs::write(from.path().join("a.der"), OTHER_MILAN_VCEK).unwrap();
        fs::write(from.path().join("b.pem"), TURIN_VCEK).unwrap();
        fs::write(from.path().join("chain.pem"), MILAN_CHAIN).unwrap();
        let got = import_dir(&cache, from.path(), at("2026-12-01")).unwrap();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(cache.vceks().len(), 3);
        assert!(cache.chain_file(Product::Milan).is_file());
        let turin = HostIdentity::from_report(TURIN_REPORT, None).unwrap();
        assert!(cache.lookup(&turin).is_some(), "filed under the chip and TCB of its extensions");
        // A VLEK is reported, not filed (it is the cloud provider's, not this chip's).
        fs::write(from.path().join("c.der"), VLEK).unwrap();
        let got = import_dir(&cache, from.path(), at("2026-12-01")).unwrap();
        assert!(got.iter().any(|i| matches!(i, Imported::Known(k) if k.starts_with("SEV-VLEK"))));
        assert_eq!(cache.vceks().len(), 3);
        // A file that is not a certificate fails the import, naming the file.
        fs::write(from.path().join("d.der"), b"junk").unwrap();
        let (file, why) = import_dir(&cache, from.path(), at("2026-12-01")).unwrap_err();
        assert!(file.ends_with("d.der"), "{why}");
    }
}
