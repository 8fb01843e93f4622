//! Unit and property tests of the rewriting, the self-reference rules and the CA pipeline. The
//! comparison with a real Nix 2.8 is in `nix-formats/tests/nar_ca_real_nix.rs`.

use super::*;
use crate::nar::NarWriter;
use crate::store_path::StorePath;
use proptest::prelude::*;

/// Nix 2.8's `RewritingSink` over the whole input at once (`std::string::find` from the last
/// match's start), as the reference for the streaming version.
fn rewrite_whole(s: &[u8], from: &[u8], to: &[u8]) -> (Vec<u8>, Vec<u64>) {
    let mut s = s.to_vec();
    let mut matches = Vec::new();
    let mut j = 0;
    while let Some(k) = s[j..].windows(from.len()).position(|w| w == from) {
        let at = j + k;
        matches.push(at as u64);
        s[at..at + from.len()].copy_from_slice(to);
        j = at;
    }
    (s, matches)
}

fn h32(s: &str) -> [u8; 32] {
    s.as_bytes().try_into().unwrap()
}

const A: &str = "dc04vv14dak1c1r48qa0m23vr9jy8sm0";
const B: &str = "zc842j0rz61mjsp3h3wp5ly71ak6qgdn";

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn streaming_rewrite_equals_whole_rewrite(
        parts in prop::collection::vec((prop::collection::vec(prop_oneof![Just(b'a'), Just(b'0'), any::<u8>()], 0..40), 0u8..4), 1..10),
        cut in 1usize..70,
        zero in any::<bool>(),
    ) {
        let mut data = Vec::new();
        for (filler, k) in &parts {
            data.extend_from_slice(filler);
            match k {
                0 => data.extend_from_slice(A.as_bytes()),
                1 => data.extend_from_slice(&A.as_bytes()[..20]),
                _ => {}
            }
        }
        let to = if zero { [0u8; 32] } else { h32(B) };
        let (want, want_matches) = rewrite_whole(&data, A.as_bytes(), &to);
        let mut rw = Rewriter::recording(h32(A), to);
        let mut out = Vec::new();
        for c in data.chunks(cut) {
            rw.process(c, &mut out);
        }
        rw.finish(&mut out);
        prop_assert_eq!(out, want);
        prop_assert_eq!(rw.matches(), &want_matches[..]);

        let mut rr = RewriteReader::new(&data[..], &[(h32(A), to)]);
        let mut got = Vec::new();
        rr.read_to_end(&mut got).unwrap();
        prop_assert_eq!(got, rewrite_whole(&data, A.as_bytes(), &to).0);
    }
}

#[test]
fn chain_applies_in_order() {
    // A → B, then B → zeros: both end up zero, as two sequential rewriteStrings would do.
    let data = format!("x{A}y{B}z");
    let mut c = RewriteChain::new(&[(h32(A), h32(B)), (h32(B), [0; 32])]);
    let mut out = Vec::new();
    c.process(data.as_bytes(), &mut out);
    c.finish(&mut out);
    let mut want = b"x".to_vec();
    want.extend_from_slice(&[0; 32]);
    want.push(b'y');
    want.extend_from_slice(&[0; 32]);
    want.push(b'z');
    assert_eq!(out, want);
}

#[test]
fn rule_per_version() {
    assert_eq!(SelfRefRule::for_nix_version(2, 8), SelfRefRule::ZeroAndPositions);
    assert_eq!(SelfRefRule::for_nix_version(2, 16), SelfRefRule::ZeroAndPositions);
    assert_eq!(SelfRefRule::for_nix_version(2, 17), SelfRefRule::ZeroOnly);
    assert_eq!(SelfRefRule::for_nix_version(2, 34), SelfRefRule::ZeroOnly);
    assert_eq!(SelfRefRule::for_nix_version(2, 35), SelfRefRule::ZeroAndPositions);
    assert_eq!(SelfRefRule::for_nix_version(3, 0), SelfRefRule::ZeroAndPositions);
}

#[test]
fn hash_modulo_appends_decimal_positions() {
    let data = format!("ab{A}cd{A}");
    let mut zeroed = b"ab".to_vec();
    zeroed.extend_from_slice(&[0; 32]);
    zeroed.extend_from_slice(b"cd");
    zeroed.extend_from_slice(&[0; 32]);
    for (rule, suffix) in
        [(SelfRefRule::ZeroAndPositions, &b"|2|36"[..]), (SelfRefRule::ZeroOnly, b"")]
    {
        let mut s = HashModuloSink::new(HashAlgo::Sha256, h32(A), rule);
        s.update(data.as_bytes());
        let (h, size, matches) = s.finish();
        let mut want = zeroed.clone();
        want.extend_from_slice(suffix);
        assert_eq!(h, HashAlgo::Sha256.digest(&want), "{rule:?}");
        assert_eq!(size, data.len() as u64);
        assert_eq!(matches, [2, 36]);
    }
}

/// The scenario of Nix's `tests/functional/make-content-addressed.{sh,nix}` (PR #15931): an
/// output whose `self-ref` file holds its own path, and the same output with that one
/// occurrence already zeroed. Under 2.17–2.34's rule both get the same CA path (the collision of
/// NixOS/nix#15837); under ≤2.16 and ≥2.35 they differ.
#[test]
fn zeroed_self_reference_collides_only_without_positions() {
    let drv = StorePath::from_base_name(&format!("{B}-foo.drv")).unwrap();
    let scratch = scratch_path(&drv, "out").unwrap();
    let make = |zero_one: bool| {
        let mut w = NarWriter::new(Vec::new()).unwrap();
        w.dir_start().unwrap();
        w.entry(b"always-self-ref").unwrap();
        w.regular(false, format!("hello {scratch}\n").as_bytes()).unwrap();
        w.entry_end().unwrap();
        w.entry(b"self-ref").unwrap();
        let mut line = b"hello /nix/store/".to_vec();
        if zero_one {
            line.extend_from_slice(&[0; 32]);
        } else {
            line.extend_from_slice(scratch.hash_part().as_bytes());
        }
        line.extend_from_slice(b"-foo\n");
        w.regular(false, &line).unwrap();
        w.entry_end().unwrap();
        w.dir_end().unwrap();
        w.into_inner()
    };
    let spec = [CaOutputSpec {
        name: "out".into(),
        method: FileIngestionMethod::Recursive,
        algo: HashAlgo::Sha256,
    }];
    let path = |nar: &Vec<u8>, rule| {
        let out =
            compute_ca_outputs(&drv, &spec, &BTreeSet::new(), rule, &NarLimits::default(), |_| {
                Ok(&nar[..])
            })
            .unwrap();
        let o = &out["out"];
        assert!(o.references.contains(&o.path), "self-reference kept");
        o.path.clone()
    };
    let (full, zeroed) = (make(false), make(true));
    assert_eq!(path(&full, SelfRefRule::ZeroOnly), path(&zeroed, SelfRefRule::ZeroOnly));
    assert_ne!(
        path(&full, SelfRefRule::ZeroAndPositions),
        path(&zeroed, SelfRefRule::ZeroAndPositions)
    );
    assert_ne!(path(&full, SelfRefRule::ZeroOnly), path(&full, SelfRefRule::ZeroAndPositions));
}

fn single_file_nar(exec: bool, contents: &[u8]) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.regular(exec, contents).unwrap();
    w.into_inner()
}

#[test]
fn multiple_outputs_in_reference_order_with_cycle_detection() {
    let drv = StorePath::from_base_name(&format!("{A}-multi.drv")).unwrap();
    let s_out = scratch_path(&drv, "out").unwrap();
    let s_dev = scratch_path(&drv, "dev").unwrap();
    assert_eq!(s_dev.name(), "multi-dev");
    let spec = |n: &str| CaOutputSpec {
        name: n.into(),
        method: FileIngestionMethod::Recursive,
        algo: HashAlgo::Sha256,
    };
    let specs = [spec("out"), spec("dev")];
    let nars: BTreeMap<&str, Vec<u8>> = [
        ("out", single_file_nar(false, format!("uses {s_dev} and {s_out}").as_bytes())),
        ("dev", single_file_nar(false, b"headers")),
    ]
    .into();
    let res = compute_ca_outputs(
        &drv,
        &specs,
        &BTreeSet::new(),
        SelfRefRule::ZeroAndPositions,
        &NarLimits::default(),
        |n| Ok(&nars[n][..]),
    )
    .unwrap();
    let (out, dev) = (&res["out"], &res["dev"]);
    assert!(dev.references.is_empty());
    assert_eq!(out.references, [out.path.clone(), dev.path.clone()].into());
    // The final NAR of `out` names the final paths, and hashes to nar_hash.
    let mut fin = Vec::new();
    out.final_nar(&nars["out"][..]).read_to_end(&mut fin).unwrap();
    let text = String::from_utf8_lossy(&fin).into_owned();
    assert!(text.contains(&format!("uses {} and {}", dev.path, out.path)), "{text}");
    assert_eq!(
        crate::nar::hash_nar(&fin[..]).unwrap().sha256,
        out.nar_hash.sha256_bytes().unwrap()
    );
    assert_eq!(fin.len() as u64, out.nar_size);
    // Content address of `out` checks out with the verifier.
    crate::content_address::verify(
        &out.path,
        &out.ca,
        &out.references,
        &fin[..],
        SelfRefRule::ZeroAndPositions,
        &NarLimits::default(),
    )
    .unwrap();

    let cyclic: BTreeMap<&str, Vec<u8>> = [
        ("out", single_file_nar(false, s_dev.to_string().as_bytes())),
        ("dev", single_file_nar(false, s_out.to_string().as_bytes())),
    ]
    .into();
    let err = compute_ca_outputs(
        &drv,
        &specs,
        &BTreeSet::new(),
        SelfRefRule::ZeroAndPositions,
        &NarLimits::default(),
        |n| Ok(&cyclic[n][..]),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::Cycle { .. }), "{err}");
}

#[test]
fn flat_outputs() {
    let drv = StorePath::from_base_name(&format!("{A}-flat.drv")).unwrap();
    let input = StorePath::from_base_name(&format!("{B}-input")).unwrap();
    let spec = [CaOutputSpec {
        name: "out".into(),
        method: FileIngestionMethod::Flat,
        algo: HashAlgo::Sha256,
    }];
    let lim = NarLimits::default();
    let run = |nar: Vec<u8>| {
        compute_ca_outputs(
            &drv,
            &spec,
            &[input.clone()].into(),
            SelfRefRule::ZeroAndPositions,
            &lim,
            |_| Ok(std::io::Cursor::new(nar.clone())),
        )
    };

    let ok = run(single_file_nar(false, b"hello\n")).unwrap();
    let o = &ok["out"];
    // Flat SHA-256: the `output:out` path over "fixed:out:sha256:<hex>:".
    let h = HashAlgo::Sha256.digest(b"hello\n");
    assert_eq!(o.ca.to_string(), format!("fixed:sha256:{}", h.to_nix32()));
    assert_eq!(
        o.path,
        make_fixed_output_path("flat", FileIngestionMethod::Flat, &h, &BTreeSet::new(), false)
            .unwrap()
    );

    assert!(matches!(
        run(single_file_nar(true, b"x")).unwrap_err(),
        CaError::FlatNotRegularFile(_)
    ));
    let refs = run(single_file_nar(false, input.to_string().as_bytes())).unwrap_err();
    assert!(matches!(refs, CaError::ReferencesNotAllowed { .. }), "{refs}");
}

#[test]
fn invalid_scratch_nar_is_refused() {
    let drv = StorePath::from_base_name(&format!("{A}-bad.drv")).unwrap();
    let spec = [CaOutputSpec {
        name: "out".into(),
        method: FileIngestionMethod::Recursive,
        algo: HashAlgo::Sha256,
    }];
    let mut nar = single_file_nar(false, b"x");
    nar.push(0);
    let err = compute_ca_outputs(
        &drv,
        &spec,
        &BTreeSet::new(),
        SelfRefRule::ZeroOnly,
        &NarLimits::default(),
        |_| Ok(&nar[..]),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::Nar { source: NarError::TrailingData { .. }, .. }), "{err:?}");
}
