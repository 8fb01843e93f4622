//! Unit tests of [`super`]: NixOS/nix's golden vectors (`src/libstore-tests/data/realisation/`)
//! and property tests of every round trip.

use super::*;
use proptest::prelude::*;

const NIX_TEST_KEY: &str = "test-key:tU7tTvLcScf8pmz/eTV0BEtLmRsPpZfKaRcd0nCN+pysBZPHSeg61/u2oc7mIOewfuAY1V1BiX32homTaDJ2Jw==";
const G: &str = "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q";

fn key() -> DrvOutputKey {
    DrvOutputKey {
        drv_path: StorePath::from_base_name(&format!("{G}-bar.drv")).unwrap(),
        output: "foo".into(),
    }
}

#[test]
fn new_format_vectors() {
    let sk = SecretKey::parse(NIX_TEST_KEY).unwrap();
    // simple-fingerprint.txt / simple-sig.json
    let mut e =
        BuildTraceEntry::new(key(), StorePath::from_base_name(&format!("{G}-foo")).unwrap());
    assert_eq!(
        e.fingerprint(),
        format!(
            r#"{{"key":{{"drvPath":"{G}-bar.drv","outputName":"foo"}},"value":{{"outPath":"{G}-foo"}}}}"#
        )
    );
    e.sign(&sk);
    let sig = e.signatures.iter().next().unwrap();
    assert_eq!(
        sig.sig_base64(),
        "WsjxK4/EI74COtzMDI+VCjQU9O4FydK0+YeY1CE5hUevogd+T+CPvNXza7oog3GTMS+ZlBwsC2S3ppwusKnJDg=="
    );
    assert_eq!(e.count_valid_signatures(&[sk.public_key()]), 1);
    // with-signature-fingerprint.txt / with-signature-sig.json (signatures do not change it).
    let mut w =
        BuildTraceEntry::new(key(), StorePath::from_base_name(&format!("{G}-foo.drv")).unwrap());
    w.signatures.insert(Signature { key_name: "asdf".into(), sig: [0; 64] });
    assert_eq!(
        w.fingerprint(),
        format!(
            r#"{{"key":{{"drvPath":"{G}-bar.drv","outputName":"foo"}},"value":{{"outPath":"{G}-foo.drv"}}}}"#
        )
    );
    assert_eq!(
        sk.sign(w.fingerprint().as_bytes()).sig_base64(),
        "ZE30UrOh26/EYvUaczjJtz6c4WcRYke6IEhDNN5TiFRF6Uu+H8lHofponlhfZxDDrCUlfstS/vtv3Xm2F6M/AA=="
    );
    assert_eq!(w.count_valid_signatures(&[sk.public_key()]), 0);
    assert_eq!(e.cache_path(), format!("build-trace-v2/{G}-bar.drv/foo.doi"));
}

#[test]
fn new_format_json_structured_and_unstructured() {
    let zeros = "A".repeat(86) + "==";
    let structured = format!(
        r#"{{ "key": {{ "drvPath": "{G}-bar.drv", "outputName": "foo" }},
              "value": {{ "outPath": "{G}-foo", "signatures": [ {{ "keyName": "asdf", "sig": "{zeros}" }} ] }} }}"#
    );
    let unstructured = structured.replace(
        &format!(r#"{{ "keyName": "asdf", "sig": "{zeros}" }}"#),
        &format!(r#""asdf:{zeros}""#),
    );
    let a = BuildTraceEntry::from_json(&structured).unwrap();
    let b = BuildTraceEntry::from_json(&unstructured).unwrap();
    assert_eq!(a, b);
    assert_eq!(
        a.to_json(),
        format!(
            r#"{{"key":{{"drvPath":"{G}-bar.drv","outputName":"foo"}},"value":{{"outPath":"{G}-foo","signatures":[{{"keyName":"asdf","sig":"{zeros}"}}]}}}}"#
        )
    );
    assert!(BuildTraceEntry::from_json(&structured.replace("outputName", "output")).is_err());
}

#[test]
fn legacy_vectors() {
    // with-dependent-realisations.json (Nix's pretty form; we print compact, as .doi files are).
    let id = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad!foo";
    let text = format!(
        r#"{{ "dependentRealisations": {{ "{id}": "{G}-foo.drv" }}, "id": "{id}", "outPath": "{G}-foo.drv", "signatures": [] }}"#
    );
    let r = LegacyRealisation::from_json(&text).unwrap();
    assert_eq!(r.id.to_string(), id);
    assert_eq!(
        r.to_json(),
        format!(
            r#"{{"dependentRealisations":{{"{id}":"{G}-foo.drv"}},"id":"{id}","outPath":"{G}-foo.drv","signatures":[]}}"#
        )
    );
    assert_eq!(
        r.fingerprint(),
        format!(
            r#"{{"dependentRealisations":{{"{id}":"{G}-foo.drv"}},"id":"{id}","outPath":"{G}-foo.drv"}}"#
        )
    );
    for bad in [
        "sha256:abc!out",
        "md5:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad!o",
        &id.replace("!foo", ""),
        &id.replace("!foo", "!"),
    ] {
        assert!(bad.parse::<DrvOutputId>().is_err(), "{bad}");
    }
}

proptest! {
    #[test]
    fn legacy_round_trip(h in any::<[u8; 32]>(), d in any::<[u8; 20]>(), out in "[a-z]{1,8}", seed in any::<[u8; 32]>(), ndeps in 0usize..3) {
        let sk = SecretKey::from_seed("k", seed);
        let p = StorePath::from_parts(d, "x-y").unwrap();
        let mut r = LegacyRealisation::new(DrvOutputId { drv_hash: h, output: out.clone() }, p.clone());
        for i in 0..ndeps {
            let mut h2 = h;
            h2[0] ^= i as u8 + 1;
            r.dependent_realisations.insert(DrvOutputId { drv_hash: h2, output: out.clone() }, p.clone());
        }
        r.sign(&sk);
        let back = LegacyRealisation::from_json(&r.to_json()).unwrap();
        prop_assert_eq!(back.to_json(), r.to_json());
        prop_assert_eq!(&back, &r);
        prop_assert_eq!(back.count_valid_signatures(&[sk.public_key()]), 1);
    }

    #[test]
    fn new_round_trip(d in any::<[u8; 20]>(), out in "[a-z]{1,8}", seed in any::<[u8; 32]>()) {
        let sk = SecretKey::from_seed("k", seed);
        let p = StorePath::from_parts(d, "x").unwrap();
        let drv = StorePath::from_parts(d, "x.drv").unwrap();
        let mut e = BuildTraceEntry::new(DrvOutputKey { drv_path: drv, output: out }, p);
        e.sign(&sk);
        let back = BuildTraceEntry::from_json(&e.to_json()).unwrap();
        prop_assert_eq!(&back, &e);
        prop_assert_eq!(back.count_valid_signatures(&[sk.public_key()]), 1);
    }
}
