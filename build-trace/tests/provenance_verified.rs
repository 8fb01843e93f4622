//! `vouch provenance` labels a step only after verifying it under a policy (issue 12, item 7):
//! an all-zero report under AMD's real ARK and ASK (and a real VCEK) used to be exported as a
//! `sev-snp` build; now it is not exported at all, while a step that passes keeps its label.

mod evidence_support;
mod synthetic;

use std::time::SystemTime;

use build_trace::evidence::certs::{builtin_ark, builtin_ask};
use build_trace::evidence::{EvidenceBundle, Product, Verifier};
use build_trace::provenance::{classify_evidence, in_toto, Acceptance};
use build_trace::store::TraceEntry;
use build_trace::verify::check_entry_alone;
use evidence_support::read;
use nix_formats::signing::SecretKey;
use synthetic::{build, policy};

#[test]
fn an_all_zero_report_under_amds_real_roots_is_not_exported_as_sev_snp() {
    let root = build_trace::evidence::SimulatedRoot::generate().unwrap();
    let key = SecretKey::from_seed("prov-1", [4; 32]);
    let built = build(2, &root, &key);
    let honest = built.entries[0].clone();
    // The forgery: the same statement, with a report of zeros under AMD's Milan chain.
    let zero = EvidenceBundle {
        report: vec![0; 1184],
        vek: read("virtee-sev/vcek_milan.der"),
        ask: Some(builtin_ask(Product::Milan)),
        ark: builtin_ark(Product::Milan),
        provider: Some("sev_guest".into()),
    };
    let forged = TraceEntry {
        evidence: Some(zero.to_json().into_bytes()),
        jws: Vec::new(),
        location: "forged".into(),
        ..honest.clone()
    };
    // The label from the root alone said sev-snp: the attack.
    assert_eq!(classify_evidence(forged.evidence.as_deref().unwrap()), "sev-snp");
    let st = forged.parse_statement().unwrap();
    let label = Acceptance { kind: "sev-snp", rules: &["amd".into()], keys: &[] };
    let old = in_toto(&st, "out", &forged.statement, forged.evidence.as_deref(), &label).unwrap();
    assert_eq!(
        old["predicate"]["runDetails"]["builder"]["id"],
        "urn:vouch:builder:sev-snp:rule:amd"
    );

    // Verified under a policy, it is not exported at all.
    let p = policy(&root, &key, "builder:sim");
    let prepared = p.prepare().unwrap();
    let ev = Verifier::new();
    let now = SystemTime::now();
    let e = check_entry_alone(&prepared, &ev, &forged, now).unwrap_err();
    assert!(e.to_string().to_lowercase().contains("evidence"), "{e}");
    // Nor under a policy that trusts AMD (and any guest): its report does not verify.
    let amd = build_trace::trust::TrustPolicy::from_toml(
        "require = \"builder:amd\"\n[builders.amd.evidence]\nmeasurements = \"any\"\n",
    )
    .unwrap()
    .prepare()
    .unwrap();
    assert!(check_entry_alone(&amd, &ev, &forged, now).is_err());
    // The honest entry passes and keeps its label.
    let ok = check_entry_alone(&prepared, &ev, &honest, now).unwrap();
    assert_eq!(ok.kind, "simulated");
    assert_eq!(ok.rules, ["sim"], "the rule that accepted it");
}
