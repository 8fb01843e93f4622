//! Property tests: every derivation round-trips through ATerm and `nix show-derivation` JSON,
//! and the hashing functions never panic on arbitrary (even inconsistent) derivations.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::json::parse_show_derivation;
use super::{CaMethod, Derivation, DerivationError, DerivationOutput, DrvGraph};
use crate::hash::{Hash, HashAlgo};
use crate::resolve::resolve;
use crate::store_path::StorePath;

fn path(suffix: &'static str) -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), "[a-z][a-z0-9+._-]{0,10}")
        .prop_map(move |(d, n)| StorePath::from_parts(d, &format!("{n}{suffix}")).unwrap())
}

fn method() -> impl Strategy<Value = CaMethod> {
    prop_oneof![Just(CaMethod::Flat), Just(CaMethod::Recursive), Just(CaMethod::Text)]
}

fn algo() -> impl Strategy<Value = HashAlgo> {
    prop::sample::select(HashAlgo::ALL.to_vec())
}

fn output() -> impl Strategy<Value = DerivationOutput> {
    prop_oneof![
        path("").prop_map(DerivationOutput::InputAddressed),
        (method(), algo(), any::<[u8; 64]>(), path("")).prop_map(|(method, a, bytes, path)| {
            DerivationOutput::Fixed {
                method,
                hash: Hash::new(a, &bytes[..a.size()]).unwrap(),
                path,
            }
        }),
        (method(), algo()).prop_map(|(method, algo)| DerivationOutput::Floating { method, algo }),
        Just(DerivationOutput::Deferred),
        (method(), algo()).prop_map(|(method, algo)| DerivationOutput::Impure { method, algo }),
    ]
}

/// Strings with everything the escaped ATerm fields must survive.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[\"\\\\\n\r\t a-z\u{1}\u{7f}ü😀]{0,12}"]
}

prop_compose! {
    pub(crate) fn derivation()(
        outputs in prop::collection::btree_map("[a-z][a-z0-9]{0,5}", output(), 0..4),
        input_drvs in prop::collection::btree_map(
            path(".drv"),
            prop::collection::btree_set("[a-z]{1,5}", 0..3),
            0..3,
        ),
        input_srcs in prop::collection::btree_set(path(""), 0..3),
        platform in "[a-z0-9_-]{0,12}",
        builder in text(),
        args in prop::collection::vec(text(), 0..4),
        env in prop::collection::btree_map(text(), text(), 0..5),
    ) -> Derivation {
        Derivation { outputs, input_drvs, input_srcs, platform, builder, args, env }
    }
}

proptest! {
    #[test]
    fn aterm_round_trip(d in derivation()) {
        let bytes = d.to_aterm();
        let back = Derivation::from_aterm(&bytes).unwrap();
        prop_assert_eq!(&back, &d);
        prop_assert_eq!(back.to_aterm(), bytes);
    }

    #[test]
    fn json_round_trip(d in derivation(), p in path(".drv")) {
        let json = d.to_show_derivation_json(&p);
        let back = parse_show_derivation(&json).unwrap();
        prop_assert_eq!(back.len(), 1);
        prop_assert_eq!(&back[&p], &d);
    }

    #[test]
    fn hashing_and_resolution_never_panic(d in derivation(), out in path("")) {
        let _ = d.drv_path("x");
        let _ = d.check_output_paths("x");
        let missing = &mut |p: &StorePath| Err(DerivationError::MissingInputDrv(p.clone()));
        let _ = d.hash_modulo("x", true, missing);
        let mut g = DrvGraph::new();
        for i in d.input_drvs.keys() {
            g.insert(i.clone(), d.clone());
        }
        let _ = g.realisation_ids(&d, "x");
        let _ = resolve(&d, "x", &mut |_, _| Some(out.clone()));
    }

    #[test]
    fn mutated_aterm_never_panics(d in derivation(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = d.to_aterm();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        if let Ok(back) = Derivation::from_aterm(&bytes) {
            prop_assert_eq!(back.to_aterm(), bytes);
        }
    }
}

#[test]
fn graph_handles_diamonds_and_rejects_cycles() {
    let mk = |inputs: &[&StorePath]| {
        let mut d = Derivation::default();
        d.outputs.insert("out".into(), DerivationOutput::Deferred);
        for i in inputs {
            d.input_drvs.insert((*i).clone(), BTreeSet::from(["out".to_string()]));
        }
        d
    };
    let p = |n: &str| StorePath::from_parts([n.as_bytes()[0]; 20], &format!("{n}.drv")).unwrap();
    let (a, b, c, top) = (p("a"), p("b"), p("c"), p("top"));
    let mut g = DrvGraph::new();
    g.insert(a.clone(), mk(&[]));
    g.insert(b.clone(), mk(&[&a]));
    g.insert(c.clone(), mk(&[&a, &b]));
    g.insert(top.clone(), mk(&[&b, &c]));
    let h = g.path_hash_modulo(&top).unwrap();
    assert!(h.deferred);
    // A cycle (impossible for real .drv files, possible in a hostile map) is an error.
    g.insert(a.clone(), mk(&[&top]));
    assert!(matches!(g.path_hash_modulo(&top), Err(DerivationError::Cycle(_))));
    assert!(matches!(g.path_hash_modulo(&p("zzz")), Err(DerivationError::MissingInputDrv(_))));
}
