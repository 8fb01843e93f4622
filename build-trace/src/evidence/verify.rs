//! The evidence verifier: runs every check of [`super`]'s algorithm in order, fails on the
//! first one that does not hold, and caches the policy-independent part of each certificate
//! chain (parsing, chain signatures, the VCEK's parsed public key) per chain.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use aws_lc_rs::signature::ParsedPublicKey;
use sha2::{Digest, Sha256};
use x509_cert::Certificate;

use super::bundle::EvidenceBundle;
use super::certs::{self, VekExtensions};
use super::error::{CertRole, Check, EvidenceError};
use super::policy::{EvidencePolicy, Expected, Hex, KeyId, Measurements};
use super::report::{
    describe_policy, Product, Report, SigningKey, TcbLayout, TcbVersion, SIG_ALGO_ECDSA_P384_SHA384,
};
use super::verified::{Root, Signer, VekKind, VerifiedEvidence};

/// The root of a chain as far as the cache knows, before the policy is consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChainRoot {
    Amd(Product),
    /// A self-signed ECDSA P-384 root: acceptable only when the policy names it.
    SelfSigned(KeyId),
}

/// The policy-independent facts about one verified chain.
#[derive(Debug)]
struct ChainInfo {
    root: ChainRoot,
    ark_subject: String,
    kind: VekKind,
    exts: VekExtensions,
    vek_key_id: KeyId,
    /// The VCEK/VLEK key, parsed once (ECDSA P-384/SHA-384, fixed-width r || s).
    key: ParsedPublicKey,
    validity: Vec<(CertRole, SystemTime, SystemTime)>,
    names: String,
}

/// Chains kept; the cache is emptied when full.
const CACHE_LIMIT: usize = 64;

/// Verifies SNP evidence. Cheap to share (`&self` methods; the chain cache is behind a mutex).
#[derive(Debug, Default)]
pub struct Verifier {
    cache: Mutex<HashMap<[u8; 32], Arc<ChainInfo>>>,
}

/// Receives each check that passed, with a short description (for `vouch evidence check`).
pub type Observer<'a> = &'a mut dyn FnMut(Check, String);

struct Log<'a>(Option<Observer<'a>>);

impl Log<'_> {
    fn pass(&mut self, check: Check, detail: impl FnOnce() -> String) {
        if let Some(obs) = self.0.as_mut() {
            (*obs)(check, detail());
        }
    }
}

impl Verifier {
    pub fn new() -> Verifier {
        Verifier::default()
    }

    /// A process-wide verifier (shared chain cache).
    pub fn global() -> &'static Verifier {
        static GLOBAL: OnceLock<Verifier> = OnceLock::new();
        GLOBAL.get_or_init(Verifier::new)
    }

    /// Verify at the policy's `check_time`, else now.
    pub fn verify(
        &self,
        bundle: &EvidenceBundle,
        policy: &EvidencePolicy,
        expected: &Expected,
    ) -> Result<VerifiedEvidence, EvidenceError> {
        self.inspect(bundle, policy, expected, SystemTime::now(), None)
    }

    /// Verify with an injected clock `now` (the policy's `check_time`, when set, wins).
    pub fn verify_at(
        &self,
        bundle: &EvidenceBundle,
        policy: &EvidencePolicy,
        expected: &Expected,
        now: SystemTime,
    ) -> Result<VerifiedEvidence, EvidenceError> {
        self.inspect(bundle, policy, expected, now, None)
    }

    /// [`Verifier::verify_at`], reporting each passed check to `observer` (the failing check
    /// is the returned error's [`EvidenceError::check`]). The checks run in the order of the
    /// algorithm in [`super`]: format, chain, product, validity, signer, TCB and chip binding,
    /// signature, guest policy, VMPL, minimum TCB, measurement, HOST_DATA, REPORT_DATA,
    /// reserved bytes.
    pub fn inspect(
        &self,
        bundle: &EvidenceBundle,
        policy: &EvidencePolicy,
        expected: &Expected,
        now: SystemTime,
        observer: Option<Observer<'_>>,
    ) -> Result<VerifiedEvidence, EvidenceError> {
        let mut log = Log(observer);
        let at = policy.check_time.map_or(now, |t| t.0);
        let report = Report::parse(&bundle.report)?;
        if report.sig_algo() != SIG_ALGO_ECDSA_P384_SHA384 {
            return Err(EvidenceError::SignatureAlgorithm(report.sig_algo()));
        }
        log.pass(Check::ReportFormat, || {
            format!("version {}, ECDSA P-384 with SHA-384", report.version())
        });

        let chain = self.chain(bundle, policy, &mut log)?;
        let root = match chain.root {
            ChainRoot::Amd(product) => Root::Amd { product },
            ChainRoot::SelfSigned(key_id) => Root::Simulated { key_id },
        };
        let layout = check_product(root, &report, &chain, &mut log)?;
        check_validity(at, &chain, &mut log)?;
        check_signer(&report, &chain, policy, &mut log)?;

        let reported_tcb = TcbVersion::decode(report.reported_tcb_raw(), layout);
        check_tcb_binding(&chain.exts, &reported_tcb, layout)?;
        log.pass(Check::TcbBinding, || reported_tcb.to_string());

        let chip_id = report.chip_id();
        match chain.kind {
            VekKind::Vcek => check_chip_binding(&chain.exts, &chip_id, layout)?,
            VekKind::Vlek => {}
        }
        log.pass(Check::ChipIdBinding, || match chain.kind {
            VekKind::Vcek => {
                format!("hwID {}", hex::encode(chain.exts.hw_id.as_deref().unwrap_or_default()))
            }
            VekKind::Vlek => "not applicable (a VLEK has no hwID)".into(),
        });

        verify_report_signature(&report, &chain.key, chain.kind)?;
        log.pass(Check::ReportSignature, || "ECDSA P-384/SHA-384 over bytes 0x000..0x2A0".into());

        let measurement = check_guest(&report, root, &reported_tcb, policy, &mut log)?;
        let (host_data, report_data) = check_bound_data(&report, expected, &mut log)?;
        if let Some(offset) = report.first_nonzero_reserved(layout) {
            return Err(EvidenceError::ReservedBytes { offset, value: report.raw()[offset] });
        }
        log.pass(Check::ReservedBytes, || "all zero (including the 368 unsigned bytes)".into());

        let signer = match (root, chain.kind) {
            (Root::Simulated { .. }, _) => Signer::SimulatedChip(Hex(chip_id)),
            (_, VekKind::Vlek) if report.chip_id_masked() => Signer::Vlek(chain.vek_key_id),
            _ => Signer::Chip(Hex(chip_id)),
        };
        Ok(VerifiedEvidence {
            root,
            signer,
            vek_kind: chain.kind,
            csp_id: chain.exts.csp_id.clone(),
            version: report.version(),
            measurement,
            host_data,
            report_data,
            reported_tcb,
            policy: report.policy(),
            vmpl: report.vmpl(),
            platform_info: report.platform_info(),
            checked_at: at,
        })
    }

    /// Parse and verify the chain (cached per chain), then check its root against the policy.
    fn chain(
        &self,
        bundle: &EvidenceBundle,
        policy: &EvidencePolicy,
        log: &mut Log<'_>,
    ) -> Result<Arc<ChainInfo>, EvidenceError> {
        let key = chain_key(bundle);
        let cached = self.cache.lock().ok().and_then(|c| c.get(&key).cloned());
        let chain = match cached {
            Some(chain) => {
                check_root_policy(chain.root, &chain.ark_subject, policy)?;
                log.pass(Check::Certificates, || format!("{} (cached)", chain.names));
                log.pass(Check::Root, || root_text(chain.root));
                for check in [Check::ArkSignature, Check::AskSignature, Check::VekSignature] {
                    log.pass(check, || "ok (cached)".into());
                }
                chain
            }
            None => {
                let chain = Arc::new(build_chain(bundle, policy, log)?);
                if let Ok(mut cache) = self.cache.lock() {
                    if cache.len() >= CACHE_LIMIT {
                        cache.clear();
                    }
                    cache.insert(key, chain.clone());
                }
                chain
            }
        };
        Ok(chain)
    }
}

fn chain_key(bundle: &EvidenceBundle) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [Some(&bundle.ark), bundle.ask.as_ref(), Some(&bundle.vek)] {
        match part {
            Some(bytes) => {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(bytes);
            }
            None => h.update(u64::MAX.to_le_bytes()),
        }
    }
    h.finalize().into()
}

fn root_text(root: ChainRoot) -> String {
    match root {
        ChainRoot::Amd(p) => format!("AMD ARK-{p} (pinned SPKI SHA-256)"),
        ChainRoot::SelfSigned(k) => format!("SIMULATED root {k} (named by the policy)"),
    }
}

fn check_root_policy(
    root: ChainRoot,
    ark_subject: &str,
    policy: &EvidencePolicy,
) -> Result<(), EvidenceError> {
    match root {
        ChainRoot::Amd(product) if !policy.products.contains(&product) => {
            let allowed: Vec<String> = policy.products.iter().map(|p| p.to_string()).collect();
            Err(EvidenceError::ProductNotAllowed(product, allowed.join(", ")))
        }
        ChainRoot::SelfSigned(key_id) if !policy.names_simulated_root(&key_id) => {
            Err(EvidenceError::UntrustedRoot {
                subject: ark_subject.to_string(),
                spki_sha256: key_id.to_string(),
            })
        }
        _ => Ok(()),
    }
}

fn build_chain(
    bundle: &EvidenceBundle,
    policy: &EvidencePolicy,
    log: &mut Log<'_>,
) -> Result<ChainInfo, EvidenceError> {
    let ark = certs::parse(CertRole::Ark, &bundle.ark)?;
    let ask = bundle.ask.as_deref().map(|der| certs::parse(CertRole::Ask, der)).transpose()?;
    let vek = certs::parse(CertRole::Vek, &bundle.vek)?;
    let exts = VekExtensions::read(&vek)?;
    let names = {
        let mut n = vec![certs::subject_cn(&ark)];
        n.extend(ask.as_ref().map(certs::subject_cn));
        n.push(certs::subject_cn(&vek));
        n.join(" -> ")
    };
    log.pass(Check::Certificates, || names.clone());

    let ark_key = Hex(certs::spki_sha256(&ark));
    let root = match certs::pinned_amd_root(&ark_key.0) {
        Some(product) => ChainRoot::Amd(product),
        None if policy.names_simulated_root(&ark_key) => ChainRoot::SelfSigned(ark_key),
        None => {
            return Err(EvidenceError::UntrustedRoot {
                subject: certs::subject_cn(&ark),
                spki_sha256: ark_key.to_string(),
            })
        }
    };
    let ark_subject = certs::subject_cn(&ark);
    check_root_policy(root, &ark_subject, policy)?;
    log.pass(Check::Root, || root_text(root));

    let kind = match root {
        ChainRoot::Amd(_) => {
            let ask = ask.as_ref().ok_or(EvidenceError::MissingCertificate(CertRole::Ask))?;
            certs::verify_rsa_pss(&ark, &ark).map_err(EvidenceError::ArkSignature)?;
            log.pass(Check::ArkSignature, || "RSA-PSS SHA-384".into());
            certs::verify_rsa_pss(&ark, ask).map_err(EvidenceError::AskSignature)?;
            log.pass(Check::AskSignature, || "RSA-PSS SHA-384".into());
            let kind = intermediate_kind(ask)?;
            certs::verify_rsa_pss(ask, &vek)
                .map_err(|source| EvidenceError::VekSignature { issuer: "ASK/ASVK", source })?;
            log.pass(Check::VekSignature, || "RSA-PSS SHA-384".into());
            kind
        }
        ChainRoot::SelfSigned(_) => {
            certs::verify_ecdsa_p384(&ark, &ark).map_err(EvidenceError::ArkSignature)?;
            log.pass(Check::ArkSignature, || "ECDSA P-384 SHA-384 (simulated)".into());
            let issuer = match &ask {
                Some(ask) => {
                    certs::verify_ecdsa_p384(&ark, ask).map_err(EvidenceError::AskSignature)?;
                    log.pass(Check::AskSignature, || "ECDSA P-384 SHA-384 (simulated)".into());
                    ask
                }
                None => {
                    log.pass(Check::AskSignature, || {
                        "none: the simulated ARK signs the VCEK".into()
                    });
                    &ark
                }
            };
            certs::verify_ecdsa_p384(issuer, &vek).map_err(|source| {
                EvidenceError::VekSignature { issuer: "simulated ARK", source }
            })?;
            log.pass(Check::VekSignature, || "ECDSA P-384 SHA-384 (simulated)".into());
            VekKind::Vcek
        }
    };

    let key =
        certs::vek_public_key(&vek).map_err(|problem| EvidenceError::CertificateExtension {
            role: CertRole::Vek,
            oid: "subjectPublicKeyInfo",
            problem,
        })?;
    let mut validity = vec![with_role(CertRole::Ark, &ark)];
    validity.extend(ask.as_ref().map(|a| with_role(CertRole::Ask, a)));
    validity.push(with_role(CertRole::Vek, &vek));
    Ok(ChainInfo {
        root,
        ark_subject,
        kind,
        exts,
        vek_key_id: Hex(certs::spki_sha256(&vek)),
        key,
        validity,
        names,
    })
}

fn with_role(role: CertRole, cert: &Certificate) -> (CertRole, SystemTime, SystemTime) {
    let (a, b) = certs::validity(cert);
    (role, a, b)
}

/// AMD names its intermediates "SEV-<product>" (ASK, signs VCEKs) and "SEV-VLEK-<product>"
/// (ASVK, signs VLEKs); the ARK's signature makes the name trustworthy.
fn intermediate_kind(ask: &Certificate) -> Result<VekKind, EvidenceError> {
    let cn = certs::subject_cn(ask);
    if cn.starts_with("SEV-VLEK-") {
        Ok(VekKind::Vlek)
    } else if cn.starts_with("SEV-") {
        Ok(VekKind::Vcek)
    } else {
        Err(EvidenceError::UnknownIntermediate(cn))
    }
}

fn check_tcb_binding(
    exts: &VekExtensions,
    tcb: &TcbVersion,
    layout: TcbLayout,
) -> Result<(), EvidenceError> {
    let mut pairs = vec![
        ("bootloader", certs::oid::BL_SPL, exts.bootloader, tcb.bootloader),
        ("tee", certs::oid::TEE_SPL, exts.tee, tcb.tee),
        ("snp", certs::oid::SNP_SPL, exts.snp, tcb.snp),
        ("microcode", certs::oid::UCODE_SPL, exts.microcode, tcb.microcode),
    ];
    if layout == TcbLayout::Turin {
        pairs.insert(0, ("fmc", certs::oid::FMC_SPL, exts.fmc, tcb.fmc.unwrap_or(0)));
    }
    for (component, oid, cert, report) in pairs {
        let cert = cert.ok_or(EvidenceError::CertificateExtension {
            role: CertRole::Vek,
            oid,
            problem: "missing".into(),
        })?;
        if cert != report {
            return Err(EvidenceError::TcbBinding { component, cert, report });
        }
    }
    Ok(())
}

fn check_chip_binding(
    exts: &VekExtensions,
    chip_id: &[u8; 64],
    layout: TcbLayout,
) -> Result<(), EvidenceError> {
    let hw_id = exts.hw_id.as_deref().ok_or(EvidenceError::CertificateExtension {
        role: CertRole::Vek,
        oid: certs::oid::HW_ID,
        problem: "missing (a VCEK must name its chip)".into(),
    })?;
    let ok = match layout {
        // Turin VCEKs carry an 8-byte hwID; the rest of CHIP_ID must be zero.
        TcbLayout::Turin => {
            hw_id.len() == 8 && chip_id[..8] == *hw_id && chip_id[8..].iter().all(|&b| b == 0)
        }
        TcbLayout::MilanGenoa => hw_id.len() == 64 && chip_id[..] == *hw_id,
    };
    if ok {
        Ok(())
    } else {
        Err(EvidenceError::ChipIdBinding { cert: hex::encode(hw_id), report: hex::encode(chip_id) })
    }
}

/// ECDSA P-384/SHA-384 over the raw bytes 0x000..0x2A0; r and s are stored little-endian in
/// 72-byte fields whose top 24 bytes must be zero. aws-lc-rs takes them as big-endian `r || s`
/// and rejects r or s outside `1..n`.
fn verify_report_signature(
    report: &Report,
    key: &ParsedPublicKey,
    kind: VekKind,
) -> Result<(), EvidenceError> {
    let (r_le, s_le) = report.signature_le();
    if r_le[48..].iter().chain(&s_le[48..]).any(|&b| b != 0) {
        return Err(EvidenceError::SignatureEncoding("r or s has non-zero bytes above 48"));
    }
    let mut sig = [0u8; 96];
    for i in 0..48 {
        sig[i] = r_le[47 - i];
        sig[48 + i] = s_le[47 - i];
    }
    key.verify_sig(report.signed_bytes(), &sig)
        .map_err(|_| EvidenceError::ReportSignature(kind.name()))
}

/// The product: the report, the VCEK/VLEK certificate and the root must agree. Returns the
/// TCB layout the product's reports use (a simulated root uses Milan/Genoa's).
fn check_product(
    root: Root,
    report: &Report,
    chain: &ChainInfo,
    log: &mut Log<'_>,
) -> Result<TcbLayout, EvidenceError> {
    let Root::Amd { product } = root else {
        log.pass(Check::Product, || "SIMULATED (no AMD product)".into());
        return Ok(TcbLayout::MilanGenoa);
    };
    let hint = report.product_hint();
    if !hint.admits(product) {
        return Err(EvidenceError::product_mismatch(product, "report", hint));
    }
    let name = chain.exts.product_name.as_deref().ok_or(EvidenceError::CertificateExtension {
        role: CertRole::Vek,
        oid: certs::oid::PRODUCT_NAME,
        problem: "missing".into(),
    })?;
    if Product::from_cert_name(name) != Some(product) {
        return Err(EvidenceError::ProductMismatch {
            root: product,
            source_name: "VCEK/VLEK productName",
            found: name.to_string(),
        });
    }
    log.pass(Check::Product, || format!("{product} (report: {hint}, certificate: {name})"));
    Ok(product.tcb_layout())
}

/// Every certificate of the chain is valid at `at`.
fn check_validity(
    at: SystemTime,
    chain: &ChainInfo,
    log: &mut Log<'_>,
) -> Result<(), EvidenceError> {
    for (role, not_before, not_after) in &chain.validity {
        if at < *not_before || at > *not_after {
            return Err(EvidenceError::CertificateValidity {
                role: *role,
                at: certs::fmt_time(at),
                not_before: certs::fmt_time(*not_before),
                not_after: certs::fmt_time(*not_after),
            });
        }
    }
    log.pass(Check::Validity, || {
        let vek = chain.validity.last().map(|v| (v.1, v.2));
        let span = vek
            .map(|(a, b)| format!(", VCEK/VLEK {} .. {}", certs::fmt_time(a), certs::fmt_time(b)));
        format!("all valid at {}{}", certs::fmt_time(at), span.unwrap_or_default())
    });
    Ok(())
}

/// The signer kind: a VLEK only where the policy allows it, never MASK_CHIP_KEY, and the
/// report's KEY_INFO names the kind of certificate that came with it.
fn check_signer(
    report: &Report,
    chain: &ChainInfo,
    policy: &EvidencePolicy,
    log: &mut Log<'_>,
) -> Result<(), EvidenceError> {
    if chain.kind == VekKind::Vlek && !policy.allow_vlek {
        return Err(EvidenceError::VlekNotAllowed);
    }
    if report.mask_chip_key() {
        return Err(EvidenceError::MaskChipKey);
    }
    let expected_key = match chain.kind {
        VekKind::Vcek => SigningKey::Vcek,
        VekKind::Vlek => SigningKey::Vlek,
    };
    if report.signing_key() != expected_key {
        return Err(EvidenceError::SigningKeyMismatch {
            report: report.signing_key(),
            cert: chain.kind.name(),
        });
    }
    log.pass(Check::SignerKind, || format!("{} (KEY_INFO agrees)", chain.kind.name()));
    Ok(())
}

/// The guest as the policy wants it: guest policy, VMPL, minimum TCB, measurement. Returns
/// the measurement.
fn check_guest(
    report: &Report,
    root: Root,
    reported_tcb: &TcbVersion,
    policy: &EvidencePolicy,
    log: &mut Log<'_>,
) -> Result<Hex<48>, EvidenceError> {
    policy.guest_policy.check(report.policy())?;
    log.pass(Check::GuestPolicy, || describe_policy(report.policy()));

    if report.vmpl() != policy.vmpl {
        return Err(EvidenceError::Vmpl { got: report.vmpl(), want: policy.vmpl });
    }
    log.pass(Check::Vmpl, || report.vmpl().to_string());

    let product = match root {
        Root::Amd { product } => Some(product),
        Root::Simulated { .. } => None,
    };
    policy.min_tcb.check(product, reported_tcb)?;
    log.pass(Check::MinimumTcb, || match policy.min_tcb.for_product(product) {
        Some(min) => format!("{reported_tcb} >= {min}"),
        None => "no minimum set for this product".into(),
    });

    let measurement = Hex(report.measurement());
    if let Some(allowed) = &policy.measurements {
        if !allowed.allows(&measurement) {
            return Err(EvidenceError::Measurement(measurement.to_string()));
        }
    }
    log.pass(Check::Measurement, || match policy.measurements {
        Some(Measurements::Only(_)) => format!("{measurement} (allowed)"),
        Some(Measurements::Any) => format!("{measurement} (ANY GUEST: the policy allows any)"),
        None => format!("{measurement} (not checked: no allowed set)"),
    });
    Ok(measurement)
}

/// HOST_DATA and REPORT_DATA against what the caller expects (each checked where given).
fn check_bound_data(
    report: &Report,
    expected: &Expected,
    log: &mut Log<'_>,
) -> Result<(Hex<32>, Hex<64>), EvidenceError> {
    let host_data = Hex(report.host_data());
    if let Some(want) = expected.host_data {
        if want != host_data.0 {
            return Err(EvidenceError::HostData {
                got: host_data.to_string(),
                want: hex::encode(want),
            });
        }
    }
    log.pass(Check::HostData, || match expected.host_data {
        Some(_) => format!("{host_data} (as expected)"),
        None => format!("{host_data} (not checked)"),
    });
    let report_data = Hex(report.report_data());
    if let Some(want) = expected.report_data {
        if want != report_data.0 {
            return Err(EvidenceError::ReportData {
                got: report_data.to_string(),
                want: hex::encode(want),
            });
        }
    }
    log.pass(Check::ReportData, || match expected.report_data {
        Some(_) => format!("{report_data} (as expected)"),
        None => format!("{report_data} (not checked)"),
    });
    Ok((host_data, report_data))
}
