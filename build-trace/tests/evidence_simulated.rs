//! Simulated evidence: the per-host root, the attester, and — because simulated reports can be
//! re-signed — one mutation per checked report field, each failing with that field's error.

mod evidence_support;

use std::os::unix::fs::PermissionsExt;

use build_trace::evidence::report::offset;
use build_trace::evidence::{
    nix_key_name, Check, EvidenceBundle, EvidenceError, EvidencePolicy, Expected, Hex, Report,
    Root, Signer, SimulatedAttester, SimulatedLaunch, SimulatedRoot, TcbVersion, Verifier,
};
use evidence_support::fails;

const MEASUREMENT: [u8; 48] = [0x11; 48];
const HOST_DATA: [u8; 32] = [0x22; 32];
const REPORT_DATA: [u8; 64] = [0x33; 64];

fn expected() -> Expected {
    Expected { host_data: Some(HOST_DATA), report_data: Some(REPORT_DATA) }
}

struct Sim {
    root: SimulatedRoot,
    attester: SimulatedAttester,
    policy: EvidencePolicy,
}

fn sim() -> Sim {
    let root = SimulatedRoot::generate().unwrap();
    let attester = root.attester(SimulatedLaunch::new(MEASUREMENT, HOST_DATA));
    let mut policy = root.allowed_by(EvidencePolicy::default());
    policy.measurements = Some(vec![Hex(MEASUREMENT)].into());
    Sim { root, attester, policy }
}

impl Sim {
    fn bundle(&self) -> EvidenceBundle {
        self.root.bundle(self.attester.report(&REPORT_DATA))
    }
    /// A report with `f` applied to its raw bytes and then re-signed by the simulated VCEK.
    fn resigned(&self, f: impl FnOnce(&mut [u8])) -> EvidenceBundle {
        let mut b = self.bundle();
        f(&mut b.report);
        self.attester.sign_raw(&mut b.report);
        b
    }
    fn verify(&self, b: &EvidenceBundle) -> Result<(), EvidenceError> {
        self.verify_with(b, &self.policy)
    }
    fn verify_with(&self, b: &EvidenceBundle, p: &EvidencePolicy) -> Result<(), EvidenceError> {
        Verifier::new().verify(b, p, &expected()).map(|_| ())
    }
}

#[test]
fn simulated_evidence_verifies_only_when_the_policy_names_its_root() {
    let s = sim();
    let b = s.bundle();
    let v = Verifier::new().verify(&b, &s.policy, &expected()).unwrap();
    assert_eq!(v.root, Root::Simulated { key_id: s.root.key_id() });
    assert!(v.is_simulated());
    assert_eq!(v.signer, Signer::SimulatedChip(Hex(s.root.platform().chip_id)));
    assert_eq!(v.product(), None);
    let shown = v.to_string();
    assert!(shown.starts_with("SIMULATED evidence"), "{shown}");
    assert!(v.root.to_string().contains("SIMULATED"));
    assert!(v.signer.to_string().contains("SIMULATED"));

    // Not named: rejected, default policy included.
    let e = fails(s.verify_with(&b, &EvidencePolicy::default()), Check::Root);
    assert!(
        matches!(&e, EvidenceError::UntrustedRoot { spki_sha256, .. } if *spki_sha256 == s.root.key_id().to_string())
    );
    // Another host's simulated root in the policy does not admit this one.
    let other = SimulatedRoot::generate().unwrap();
    let p = other.allowed_by(EvidencePolicy::default());
    fails(s.verify_with(&b, &p), Check::Root);
    // A cached chain is re-checked against each policy.
    let verifier = Verifier::new();
    verifier.verify(&b, &s.policy, &expected()).unwrap();
    let e = verifier.verify(&b, &EvidencePolicy::default(), &expected()).unwrap_err();
    assert_eq!(e.check(), Check::Root);
}

#[test]
fn a_label_never_makes_simulated_evidence_real() {
    let s = sim();
    let mut b = s.bundle();
    b.provider = Some("sev_guest".into());
    let v = Verifier::new().verify(&b, &s.policy, &expected()).unwrap();
    assert!(v.is_simulated());
    // A simulated VCEK under AMD's real Milan chain fails the chain, never passes as AMD.
    let mut b = s.bundle();
    b.ark = build_trace::evidence::certs::builtin_ark(build_trace::evidence::Product::Milan);
    fails(s.verify(&b), Check::Certificates); // no ASK
    b.ask = Some(build_trace::evidence::certs::builtin_ask(build_trace::evidence::Product::Milan));
    fails(s.verify(&b), Check::VekSignature);
}

#[test]
fn report_layout_is_amds() {
    let s = sim();
    let r = Report::parse(&s.bundle().report).unwrap();
    assert_eq!(r.version(), 5);
    assert_eq!(r.sig_algo(), 1);
    assert_eq!(r.policy(), 0x30000);
    assert_eq!(r.measurement(), MEASUREMENT);
    assert_eq!(r.host_data(), HOST_DATA);
    assert_eq!(r.report_data(), REPORT_DATA);
    assert_eq!(r.chip_id(), s.root.platform().chip_id);
    assert_eq!(r.cpuid(), Some((0, 0, 0)));
    assert_eq!(r.report_id_ma(), [0xFF; 32]);
    // The sev crate parses it too (it treats unknown CPUIDs as an error, so patch the family
    // to Genoa's only for this parse: the layout is what is checked).
    let mut raw = s.bundle().report;
    raw[offset::CPUID_FAM_ID] = 0x19;
    raw[offset::CPUID_MOD_ID] = 0x11;
    use sev::parser::ByteParser;
    let theirs = sev::firmware::guest::AttestationReport::from_bytes(&raw).unwrap();
    assert_eq!(theirs.measurement, MEASUREMENT);
    assert_eq!(theirs.report_data, REPORT_DATA);
    assert_eq!(theirs.reported_tcb.snp, s.root.platform().tcb.snp);
}

#[test]
fn masked_chip_id_v2_reports_parse() {
    // The sev crate cannot parse a v2 report with a masked CHIP_ID; our raw parser can, and the
    // verifier then fails at the VCEK hwID binding rather than at parsing.
    use build_trace::evidence::report::ProductHint;
    use sev::parser::ByteParser;
    let s = sim();
    let b = s.resigned(|r| {
        r[0..4].copy_from_slice(&2u32.to_le_bytes());
        r[offset::CHIP_ID..offset::CHIP_ID + 64].fill(0);
    });
    let r = Report::parse(&b.report).unwrap();
    assert!(r.chip_id_masked());
    assert_eq!(r.product_hint(), ProductHint::Masked);
    assert!(sev::firmware::guest::AttestationReport::from_bytes(&b.report).is_err());
    fails(s.verify(&b), Check::ChipIdBinding);
}

#[test]
fn report_format_mutations() {
    let s = sim();
    for v in [1u32, 4, 6] {
        let b = s.resigned(|r| r[0..4].copy_from_slice(&v.to_le_bytes()));
        fails(s.verify(&b), Check::ReportFormat);
    }
    let e = fails(s.verify(&s.resigned(|r| r[offset::SIG_ALGO] = 0)), Check::ReportFormat);
    assert!(matches!(e, EvidenceError::SignatureAlgorithm(0)));
    // Versions 2 and 3 are accepted layouts (the v5-only fields are zero in simulated reports).
    for v in [2u32, 3] {
        let b = s.resigned(|r| r[0..4].copy_from_slice(&v.to_le_bytes()));
        s.verify(&b).unwrap_or_else(|e| panic!("version {v}: {e}"));
    }
}

#[test]
fn signer_kind_mutations() {
    let s = sim();
    let e = fails(s.verify(&s.resigned(|r| r[offset::KEY_INFO] = 1 << 2)), Check::SignerKind);
    assert!(matches!(e, EvidenceError::SigningKeyMismatch { .. }));
    let e = fails(s.verify(&s.resigned(|r| r[offset::KEY_INFO] = 7 << 2)), Check::SignerKind);
    assert!(matches!(e, EvidenceError::SigningKeyMismatch { .. }));
    let e = fails(s.verify(&s.resigned(|r| r[offset::KEY_INFO] = 2)), Check::SignerKind);
    assert!(matches!(e, EvidenceError::MaskChipKey));
}

#[test]
fn binding_mutations() {
    let s = sim();
    for (i, component) in [(0, "bootloader"), (1, "tee"), (6, "snp"), (7, "microcode")] {
        let b = s.resigned(|r| r[offset::REPORTED_TCB + i] += 1);
        let e = fails(s.verify(&b), Check::TcbBinding);
        assert!(
            matches!(e, EvidenceError::TcbBinding { component: c, .. } if c == component),
            "{e}"
        );
    }
    fails(s.verify(&s.resigned(|r| r[offset::CHIP_ID + 63] ^= 0x80)), Check::ChipIdBinding);
    fails(
        s.verify(&s.resigned(|r| r[offset::CHIP_ID..offset::CHIP_ID + 64].fill(0))),
        Check::ChipIdBinding,
    );
}

#[test]
fn signature_mutations() {
    let s = sim();
    // Changed after signing, not re-signed.
    let mut b = s.bundle();
    b.report[offset::MEASUREMENT] ^= 1;
    fails(s.verify(&b), Check::ReportSignature);
    // Signed by a different simulated VCEK key.
    let other = SimulatedRoot::generate().unwrap();
    let mut b = s.bundle();
    other.attester(SimulatedLaunch::new(MEASUREMENT, HOST_DATA)).sign_raw(&mut b.report);
    let e = fails(s.verify(&b), Check::ReportSignature);
    assert!(matches!(e, EvidenceError::ReportSignature("VCEK")));
}

#[test]
fn guest_policy_mutations() {
    let s = sim();
    let with_policy = |p: u64| {
        s.resigned(|r| r[offset::POLICY..offset::POLICY + 8].copy_from_slice(&p.to_le_bytes()))
    };
    type Is = fn(&EvidenceError) -> bool;
    let cases: [(u64, Is); 4] = [
        (0x30000 | 1 << 19, |e| matches!(e, EvidenceError::PolicyDebug { .. })),
        (0x30000 | 1 << 18, |e| matches!(e, EvidenceError::PolicyMigrationAgent { .. })),
        (0x10000, |e| matches!(e, EvidenceError::PolicyBit17 { .. })),
        (0x30000 | 1 << 40, |e| matches!(e, EvidenceError::PolicyReservedBits { .. })),
    ];
    for (policy, is) in cases {
        let e = fails(s.verify(&with_policy(policy)), Check::GuestPolicy);
        assert!(is(&e), "{policy:#x}: {e}");
    }
    // Knobs: SMT off required, single socket required, minimum ABI.
    let mut p = s.policy.clone();
    p.guest_policy.allow_smt = false;
    fails(s.verify_with(&s.bundle(), &p), Check::GuestPolicy);
    s.verify_with(&with_policy(0x20000), &p).unwrap();
    let mut p = s.policy.clone();
    p.guest_policy.require_single_socket = true;
    let e = fails(s.verify_with(&s.bundle(), &p), Check::GuestPolicy);
    assert!(matches!(e, EvidenceError::PolicySingleSocket { .. }));
    s.verify_with(&with_policy(0x130000), &p).unwrap();
    let mut p = s.policy.clone();
    p.guest_policy.min_abi_major = 1;
    p.guest_policy.min_abi_minor = 51;
    let e = fails(s.verify_with(&with_policy(0x30132), &p), Check::GuestPolicy);
    assert!(matches!(e, EvidenceError::PolicyAbi { major: 1, minor: 0x32, .. }), "{e}");
    s.verify_with(&with_policy(0x30133), &p).unwrap();
    s.verify_with(&with_policy(0x30200), &p).unwrap();
    // Allowed when the policy says so.
    let mut p = s.policy.clone();
    p.guest_policy.allow_debug = true;
    s.verify_with(&with_policy(0x30000 | 1 << 19), &p).unwrap();
}

#[test]
fn vmpl_tcb_measurement_and_data_mutations() {
    let s = sim();
    let e = fails(s.verify(&s.resigned(|r| r[offset::VMPL] = 2)), Check::Vmpl);
    assert!(matches!(e, EvidenceError::Vmpl { got: 2, want: 0 }));
    // Minimum TCB (simulated roots have their own entry).
    let mut p = s.policy.clone();
    p.min_tcb.simulated =
        Some(TcbVersion { fmc: None, bootloader: 1, tee: 1, snp: 2, microcode: 0 });
    let e = fails(s.verify_with(&s.bundle(), &p), Check::MinimumTcb);
    assert!(matches!(e, EvidenceError::TcbTooLow { component: "snp", .. }), "{e}");
    p.min_tcb.simulated = Some(s.root.platform().tcb);
    s.verify_with(&s.bundle(), &p).unwrap();
    // Measurement, HOST_DATA, REPORT_DATA changed and re-signed.
    fails(s.verify(&s.resigned(|r| r[offset::MEASUREMENT + 47] ^= 1)), Check::Measurement);
    fails(s.verify(&s.resigned(|r| r[offset::HOST_DATA] ^= 1)), Check::HostData);
    fails(s.verify(&s.resigned(|r| r[offset::REPORT_DATA + 10] ^= 1)), Check::ReportData);
}

#[test]
fn signed_reserved_byte_mutations() {
    let s = sim();
    for off in [
        0x4C,
        0x18B,
        0x19F,
        0x1EB,
        0x1EF,
        0x208,
        0x29F,
        offset::REPORTED_TCB + 3,
        offset::LAUNCH_TCB + 2,
    ] {
        let e = fails(s.verify(&s.resigned(|r| r[off] = 1)), Check::ReservedBytes);
        assert!(
            matches!(e, EvidenceError::ReservedBytes { offset, .. } if offset == off),
            "{off:#x}: {e}"
        );
    }
    fails(s.verify(&s.resigned(|r| r[0x4A0 - 1] = 1)), Check::ReservedBytes);
}

#[test]
fn load_or_generate_keeps_the_root_in_the_state_dir() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("simulated-snp");
    let a = SimulatedRoot::load_or_generate(&dir).unwrap();
    let b = SimulatedRoot::load_or_generate(&dir).unwrap();
    assert_eq!(a.key_id(), b.key_id());
    assert_eq!(a.platform(), b.platform());
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    for f in ["ark.der", "vcek.der", "vcek.key"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    // A report by the guest-side attester, built from the key the host hands over.
    let attester = SimulatedAttester::new(
        &a.vcek_key_pkcs8().unwrap(),
        a.platform(),
        SimulatedLaunch::new(MEASUREMENT, HOST_DATA),
    )
    .unwrap();
    let report = attester.report(&REPORT_DATA);
    assert_eq!(report.len(), 1184);
    let policy = b.allowed_by(EvidencePolicy::default());
    Verifier::new().verify(&b.bundle(report), &policy, &expected()).unwrap();
    // Damaged files are an error, not silently replaced.
    std::fs::write(dir.join("vcek.key"), b"junk").unwrap();
    let e = SimulatedRoot::load_or_generate(&dir).unwrap_err();
    assert!(e.to_string().contains("vcek.key"), "{e}");
    // An empty directory (made by the launcher) is filled.
    let empty = state.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    SimulatedRoot::load_or_generate(&empty).unwrap();
    assert!(empty.join("vcek.der").exists());
}

#[test]
fn concurrent_generation_agrees_on_one_root() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("sim");
    let ids: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| SimulatedRoot::load_or_generate(&dir).unwrap().key_id()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let leftovers: Vec<_> =
        std::fs::read_dir(state.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temporary directories left behind: {leftovers:?}");
}

#[test]
fn nix_key_names_say_simulated() {
    assert_eq!(nix_key_name("vouch.example.org", false), "vouch.example.org-1");
    assert_eq!(nix_key_name("vouch.example.org", true), "vouch.example.org-simulated-1");
    assert_eq!(nix_key_name("host:8080", true), "host-8080-simulated-1");
}

#[test]
fn policy_toml_round_trips_and_rejects_typos() {
    let s = sim();
    let text = s.policy.to_toml();
    assert!(text.contains(&s.root.key_id().to_string()), "{text}");
    assert_eq!(EvidencePolicy::from_toml(&text).unwrap(), s.policy);
    let example = r#"
products = ["Genoa", "Turin"]
allow_vlek = false
vmpl = 0
measurements = ["6d6c354511d6f7c6d7504668903dc5bdc066a048b651840d8d03fb85299ebfa142fccf1d1b0baca496841bdf243619d4"]
check_time = "2025-06-01T00:00:00Z"

[guest_policy]
allow_smt = false
min_abi_major = 1
min_abi_minor = 55

[min_tcb.Turin]
fmc = 1
bootloader = 1
tee = 1
snp = 4
microcode = 81
"#;
    let p = EvidencePolicy::from_toml(example).unwrap();
    assert_eq!(p.min_tcb.turin.unwrap().microcode, 81);
    assert!(!p.guest_policy.allow_debug);
    assert!(EvidencePolicy::from_toml("alow_vlek = true").is_err());
    assert!(EvidencePolicy::from_toml("products = [\"Venice\"]").is_err());
    assert!(EvidencePolicy::from_toml("measurements = [\"abcd\"]").is_err());
    assert!(EvidencePolicy::from_toml("check_time = \"yesterday\"").is_err());
}

/// A root whose certificates are valid only in a window that excludes now (an expired one, and
/// one not yet valid: a host clock outside the validity) is refused at the validity check; the
/// same root verifies at a time inside its window. `save` writes what `load` reads back.
#[test]
fn a_clock_outside_the_certificates_validity_is_refused() {
    use std::time::{Duration, SystemTime};
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let platform = SimulatedRoot::generate().unwrap().platform();
    for (from, to) in [(now - 30 * day, now - day), (now + day, now + 30 * day)] {
        let root = SimulatedRoot::generate_valid(platform, from, to).unwrap();
        let attester = root.attester(SimulatedLaunch::new(MEASUREMENT, HOST_DATA));
        let mut policy = root.allowed_by(EvidencePolicy::default());
        policy.measurements = Some(vec![Hex(MEASUREMENT)].into());
        let b = root.bundle(attester.report(&REPORT_DATA));
        let e = fails(Verifier::new().verify(&b, &policy, &expected()).map(drop), Check::Validity);
        assert!(matches!(e, EvidenceError::CertificateValidity { .. }), "{e}");
        assert!(e.to_string().contains("certificate is not valid at"), "{e}");
        Verifier::new().verify_at(&b, &policy, &expected(), from + day).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("simulated-snp");
        root.save(&kept).unwrap();
        assert_eq!(SimulatedRoot::load(&kept).unwrap().key_id(), root.key_id());
        assert!(root.save(&kept).is_err(), "an existing root is never overwritten");
    }
}
