//! One chip counted twice (issue 12, item 8): a VLEK identifies no chip (the host chooses
//! MASK_CHIP_ID, and one VLEK may serve many chips), so a VLEK-signed report lights at most one
//! builder leaf that needs one chip, and never adds to a count of distinct chips. Real AMD
//! vectors (`test-support/data/snp`): AWS's VLEK-signed Milan report and two VCEK-signed
//! Milan reports of two chips.

mod evidence_support;

use build_trace::evidence::{Expected, Signer, VekKind, Verifier};
use build_trace::trust::{Signers, TrustPolicy};
use evidence_support::*;
use nix_formats::signing::SecretKey;

/// The signers of real reports `names`, each verified under its own policy and counted under
/// builder rule `rule` as the closure verifier counts them.
fn signers_of(names: &[(&str, &str)]) -> Signers {
    let verifier = Verifier::new();
    let mut s = Signers::default();
    for (rule, name) in names {
        let c = case(name);
        let want = Expected { host_data: Some(c.host_data), report_data: Some(c.report_data) };
        let v = verifier.verify_at(&c.bundle, &c.policy, &want, c.now).unwrap();
        s.add_evidence(rule, &v);
    }
    s
}

const VLEK: &str = "trustee test-vlek";
const CHIP_A: &str = "trustee az-milan";
const CHIP_B: &str = "virtee report_milan";

fn policy(require: &str) -> TrustPolicy {
    let key = SecretKey::from_seed("self-1", [9; 32]).public_key();
    TrustPolicy::from_toml(&format!(
        "require = {require}\n[keys]\n\"self-1\" = \"{key}\"\n\
         [builders.r.evidence]\nmeasurements = \"any\"\n[builders.s.evidence]\nmeasurements = \"any\"\n"
    ))
    .unwrap()
}

#[test]
fn the_real_vectors_are_a_vlek_and_two_chips() {
    let verifier = Verifier::new();
    let signer = |name: &str| {
        let c = case(name);
        let want = Expected { host_data: Some(c.host_data), report_data: Some(c.report_data) };
        verifier.verify_at(&c.bundle, &c.policy, &want, c.now).unwrap()
    };
    let v = signer(VLEK);
    assert_eq!(v.vek_kind, VekKind::Vlek);
    assert!(matches!(v.signer, Signer::Vlek(_)));
    let (a, b) = (signer(CHIP_A), signer(CHIP_B));
    assert!(matches!((a.signer, b.signer), (Signer::Chip(x), Signer::Chip(y)) if x != y));
}

#[test]
fn a_vlek_never_adds_to_a_count_of_distinct_chips() {
    let two = policy("{ builder = \"r\", at_least = 2 }");
    // The attack: one machine as its chip (VCEK) and as a VLEK.
    assert!(!two.accepts(&signers_of(&[("r", CHIP_A), ("r", VLEK)])), "chip + VLEK is not two");
    // Two chips are.
    assert!(two.accepts(&signers_of(&[("r", CHIP_A), ("r", CHIP_B)])));
    // Two VLEKs (the host loads a second one) are not either.
    let mut vleks = signers_of(&[("r", VLEK)]);
    let mut other = vleks.clone();
    other.chips.get_mut("r").unwrap().insert("VLEK other".into());
    other.vleks.insert("VLEK other".into());
    vleks.merge(&other);
    assert!(!two.accepts(&vleks), "two VLEKs are not two chips");
    // Nor a chip under one rule and a VLEK under another.
    let split = policy("{ threshold = 2, of = [\"builder:r\", \"builder:s\"] }");
    assert!(!split.accepts(&signers_of(&[("r", CHIP_A), ("s", VLEK)])));
    assert!(split.accepts(&signers_of(&[("r", CHIP_A), ("s", CHIP_B)])));
}

#[test]
fn a_vlek_lights_a_leaf_that_needs_one_chip() {
    let vlek = signers_of(&[("r", VLEK)]);
    assert!(policy("\"builder:r\"").accepts(&vlek));
    assert!(policy("{ builder = \"r\", at_least = 1 }").accepts(&vlek));
    let mut with_key = vlek.clone();
    with_key.keys.insert("self-1".into());
    let both = policy("{ threshold = 2, of = [\"builder:r\", \"key:self-1\"] }");
    assert!(both.accepts(&with_key), "a VLEK and an independent key");
    assert!(!both.accepts(&vlek));
    // A chip and a VLEK under an OR: either alone is enough.
    let either =
        policy("{ threshold = 1, of = [{ builder = \"r\", at_least = 2 }, \"builder:s\"] }");
    assert!(either.accepts(&signers_of(&[("s", VLEK)])));
    assert!(!either.accepts(&signers_of(&[("r", VLEK)])));
}

#[test]
fn one_public_key_under_two_names_is_refused() {
    let key = SecretKey::from_seed("a", [5; 32]).public_key().to_string();
    let (_, b64) = key.split_once(':').unwrap();
    let text = format!(
        "require = {{ threshold = 2, of = [\"key:a\", \"key:b\"] }}\n\
         [keys]\n\"a\" = \"a:{b64}\"\n\"b\" = \"b:{b64}\"\n"
    );
    let e = TrustPolicy::from_toml(&text).unwrap_err().to_string();
    assert!(e.contains("same public key"), "{e}");
    // Two distinct keys are fine.
    let other = SecretKey::from_seed("b", [6; 32]).public_key();
    TrustPolicy::from_toml(&format!(
        "require = {{ threshold = 2, of = [\"key:a\", \"key:b\"] }}\n\
         [keys]\n\"a\" = \"{key}\"\n\"b\" = \"{other}\"\n"
    ))
    .unwrap();
}
