//! The trust policy format and its semantics: every TOML example in docs/trust-policy.md
//! parses, the default policy is what the doc says, thresholds count each signer once, and
//! inconsistent policies are refused with the reason.

use std::collections::{BTreeMap, BTreeSet};

use build_trace::evidence::Product;
use build_trace::trust::{Signers, TrustModel, TrustPolicy};

fn doc_examples() -> Vec<String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/trust-policy.md"))
            .unwrap();
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in doc.lines() {
        match (&mut cur, line.trim_end()) {
            (None, "```toml") => cur = Some(String::new()),
            (Some(block), "```") => {
                out.push(std::mem::take(block));
                cur = None;
            }
            (Some(block), l) => {
                block.push_str(l);
                block.push('\n');
            }
            _ => {}
        }
    }
    out
}

#[test]
fn every_documented_example_parses() {
    let examples = doc_examples();
    assert!(examples.len() >= 6, "found {} examples", examples.len());
    for e in &examples {
        TrustPolicy::from_toml(e).unwrap_or_else(|err| panic!("{err:?}\n{e}"));
    }
}

#[test]
fn the_documented_default_is_the_default() {
    let doc_default = doc_examples().into_iter().find(|e| e.contains("builder:amd")).unwrap();
    let manifest = "/var/lib/vouch/image/manifest.json".to_string();
    let default = TrustPolicy::default_for(std::slice::from_ref(&manifest)).unwrap();
    assert_eq!(TrustPolicy::from_toml(&doc_default).unwrap(), default);
    // And the default round-trips through its TOML form.
    assert_eq!(TrustPolicy::from_toml(&default.to_toml()).unwrap(), default);
    assert!(!default.trusts_simulated());
    // Milan is off, and each product it allows has a minimum TCB.
    let ev = &default.builders["amd"].evidence;
    assert_eq!(ev.products, [Product::Genoa, Product::Turin]);
    for p in &ev.products {
        assert!(ev.min_tcb.for_product(Some(*p)).is_some(), "{p} has a minimum TCB");
    }
}

#[test]
fn the_default_policy_without_a_manifest_refuses_naming_the_fix() {
    let e = TrustPolicy::default_for(&[]).unwrap_err().to_string();
    assert!(e.contains("--image-manifest") && e.contains("measurements = \"any\""), "{e}");
}

/// Every bulletin value in the minimum-TCB data file names its bulletin.
#[test]
fn every_minimum_tcb_cites_an_amd_bulletin() {
    let text = build_trace::trust::DEFAULT_MIN_TCB;
    let mut comment = String::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix('#') {
            comment.push_str(c);
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let (k, v) = (k.trim(), v.trim());
            if v != "0" {
                assert!(comment.contains("AMD-SB-30"), "`{k} = {v}` cites no AMD bulletin");
            }
        }
        if line.trim().is_empty() || line.starts_with('[') {
            comment.clear();
        }
        if line.contains('=') {
            comment.clear();
        }
    }
}

/// A builder rule that pins no measurement is refused; `measurements = "any"` is accepted and
/// marked.
#[test]
fn a_builder_rule_must_pin_measurements_or_say_any() {
    let base = "require = \"builder:r\"\n[builders.r.evidence]\nproducts = [\"Genoa\"]\n";
    let e = TrustPolicy::from_toml(base).unwrap_err().to_string();
    assert!(e.contains("pins no launch measurement") && e.contains("\"any\""), "{e}");
    let any = TrustPolicy::from_toml(&format!("{base}measurements = \"any\"\n")).unwrap();
    let prepared = any.prepare().unwrap();
    assert_eq!(prepared.any_guest_rules(), ["r"]);
    assert!(prepared.any_guest_banner().unwrap().starts_with("ANY GUEST"));
    assert!(TrustPolicy::from_toml(&format!("{base}measurements = \"some\"\n")).is_err());
    let pinned =
        TrustPolicy::from_toml(&format!("{base}measurements = [\"{}\"]\n", "ab".repeat(48)))
            .unwrap();
    assert!(pinned.prepare().unwrap().any_guest_banner().is_none());
}

fn signers(keys: &[&str], chips: &[(&str, &[&str])]) -> Signers {
    Signers {
        keys: keys.iter().map(|k| k.to_string()).collect(),
        chips: chips
            .iter()
            .map(|(r, cs)| {
                (r.to_string(), cs.iter().map(|c| c.to_string()).collect::<BTreeSet<_>>())
            })
            .collect::<BTreeMap<_, _>>(),
        vleks: BTreeSet::new(),
    }
}

#[test]
fn thresholds_nest_and_count_each_signer_once() {
    let examples = doc_examples();
    let attested = examples.iter().find(|e| e.contains("at_least = 2")).unwrap();
    let p = TrustPolicy::from_toml(attested).unwrap();
    assert!(!p.accepts(&signers(&[], &[("prod", &["chip 1"])])));
    assert!(p.accepts(&signers(&[], &[("prod", &["chip 1", "chip 2"])])));
    assert!(p.accepts(&signers(&["self-1"], &[("prod", &["chip 1"])])));
    assert!(!p.accepts(&signers(&["self-1"], &[])));
    let repro =
        examples.iter().find(|e| e.contains("cache-b-1") && e.contains("threshold = 2")).unwrap();
    let p = TrustPolicy::from_toml(repro).unwrap();
    assert!(!p.accepts(&signers(&["cache-a-1"], &[])));
    let mut merged = signers(&["cache-a-1"], &[]);
    merged.merge(&signers(&["cache-a-1"], &[]));
    assert!(!p.accepts(&merged), "the same key twice is one signer");
    merged.merge(&signers(&["cache-b-1"], &[]));
    assert!(p.accepts(&merged));
}

/// Within one model a signer counts once, too: a key named by two leaves, or a chip that passes
/// two builder rules, lights one leaf, and `at_least` chips must be distinct from the chips
/// lighting other leaves.
#[test]
fn one_signer_never_lights_two_leaves_of_a_threshold() {
    let keys =
        "[keys]\n\"cache-a-1\" = \"cache-a-1:VUYbT40EiqxQ8DDKsJ/c9NK0yyRRy+wb6+5kY20F++g=\"\n\
                \"cache-b-1\" = \"cache-b-1:udPDPw1YI0fpOJ7PVK3RRukjsban9jSncnRyYOY45vo=\"\n";
    let twice = format!(
        "require = {{ threshold = 2, of = [\"key:cache-a-1\", \"key:cache-a-1\"] }}\n{keys}"
    );
    let p = TrustPolicy::from_toml(&twice).unwrap();
    assert!(!p.accepts(&signers(&["cache-a-1"], &[])), "one key, two leaves");
    assert!(!p.accepts(&signers(&["cache-a-1", "cache-b-1"], &[])));

    let rules = "[builders.genoa.evidence]\nproducts = [\"Genoa\"]\nmeasurements = \"any\"\n\
                 [builders.amd.evidence]\nmeasurements = \"any\"\n";
    let p = TrustPolicy::from_toml(&format!(
        "require = {{ threshold = 2, of = [\"builder:genoa\", \"builder:amd\"] }}\n{rules}"
    ))
    .unwrap();
    let same_chip = signers(&[], &[("genoa", &["chip 1"]), ("amd", &["chip 1"])]);
    assert!(!p.accepts(&same_chip), "one chip passing two rules is one signer");
    assert!(p.accepts(&signers(&[], &[("genoa", &["chip 1"]), ("amd", &["chip 1", "chip 2"])])));
    // The assignment is searched for: chip 2 passes both rules, chip 1 only `genoa`.
    assert!(p.accepts(&signers(&[], &[("genoa", &["chip 1", "chip 2"]), ("amd", &["chip 2"])])));

    let p = TrustPolicy::from_toml(&format!(
        "require = {{ threshold = 2, of = [{{ builder = \"amd\", at_least = 2 }}, \"builder:genoa\"] }}\n{rules}"
    ))
    .unwrap();
    let three = |amd: &[&str]| signers(&[], &[("genoa", &["chip 1"]), ("amd", amd)]);
    assert!(!p.accepts(&three(&["chip 1", "chip 2"])), "needs three distinct chips");
    assert!(p.accepts(&three(&["chip 1", "chip 2", "chip 3"])));
    // Alternatives (OR) may name the same rule: they never combine.
    let examples = doc_examples();
    let attested = examples.iter().find(|e| e.contains("at_least = 2")).unwrap();
    let p = TrustPolicy::from_toml(attested).unwrap();
    assert!(p.accepts(&signers(&["self-1"], &[("prod", &["chip 1"])])));
}

#[test]
fn inconsistent_policies_are_refused_with_the_reason() {
    let cases = [
        ("require = \"key:nobody\"", "names no key"),
        ("require = \"builder:none\"", "names no key or builder"),
        ("require = \"chip:x\"", "neither"),
        ("require = { threshold = 0, of = [] }", "threshold 0"),
        ("require = { threshold = 3, of = [\"builder:b\"] }\n[builders.b]\n", "threshold 3"),
        ("require = { builder = \"b\", at_least = 0 }\n[builders.b]\n", "at_least = 0"),
        (
            "require = \"key:a\"\n[keys]\na = \"b:VUYbT40EiqxQ8DDKsJ/c9NK0yyRRy+wb6+5kY20F++g=\"\n",
            "named `b`",
        ),
        ("require = \"key:a\"\n[keys]\na = \"a:notbase64\"\n", "key `a`"),
        ("require = \"builder:b\"\nsurprise = 1\n[builders.b]\n", "surprise"),
        (
            &format!(
                "require = {{ threshold = 1, of = [{}] }}\n[builders.b]\n",
                vec!["\"builder:b\""; 17].join(", ")
            ),
            "at most 16",
        ),
    ];
    for (text, want) in cases {
        let err = TrustPolicy::from_toml(text).unwrap_err();
        let msg = format!("{err}: {:?}", std::error::Error::source(&err).map(|s| s.to_string()));
        assert!(msg.contains(want), "{text:?}: {msg}");
    }
}

#[test]
fn image_manifests_add_their_measurements() {
    let dir = tempfile::tempdir().unwrap();
    let snp = "11".repeat(48);
    let snp2 = "44".repeat(48);
    let sim = "22".repeat(48);
    let shapes = format!(
        r#"[{{"vcpus":1,"vcpu_type":"EPYC-v4","measurement":"{snp}"}},{{"vcpus":2,"vcpu_type":"EPYC-v4","measurement":"{snp2}"}}]"#
    );
    std::fs::write(
        dir.path().join("manifest.json"),
        format!(r#"{{"format":"x","snp":{{"expected_measurement":"{snp}","measurements":{shapes}}},"simulated_measurement":"{sim}"}}"#),
    )
    .unwrap();
    let text = "require = \"builder:b\"\n[builders.b]\nimage_manifests = [\"manifest.json\"]\n";
    std::fs::write(dir.path().join("policy.toml"), text).unwrap();
    let p = TrustPolicy::load(&dir.path().join("policy.toml")).unwrap().prepare().unwrap();
    let ms: Vec<String> = p.rules[0]
        .1
        .measurements
        .clone()
        .unwrap()
        .list()
        .unwrap()
        .iter()
        .map(|m| m.to_string())
        .collect();
    // The default launch's and one per measured vCPU count, each once.
    assert_eq!(ms, vec![snp.clone(), snp2.clone()]);
    let text =
        format!("{text}[builders.b.evidence]\nsimulated_roots = [\"{}\"]\n", "33".repeat(32));
    std::fs::write(dir.path().join("policy.toml"), text).unwrap();
    let p = TrustPolicy::load(&dir.path().join("policy.toml")).unwrap().prepare().unwrap();
    assert_eq!(p.rules[0].1.measurements.as_ref().unwrap().list().unwrap().len(), 3);
    assert!(matches!(p.policy.require, TrustModel::Leaf(_)));
}
