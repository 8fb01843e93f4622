//! Reference-scanner tests: Nix's own unit-test vectors, chunking independence (property
//! test against a naive scan) and the window primitive.

use super::*;
use crate::base32::ALPHABET;
use proptest::prelude::*;

fn sp(hash: &str) -> StorePath {
    StorePath::from_base_name(&format!("{hash}-foo")).unwrap()
}

const H1: &str = "dc04vv14dak1c1r48qa0m23vr9jy8sm0";
const H2: &str = "zc842j0rz61mjsp3h3wp5ly71ak6qgdn";

fn found(s: &RefScanner) -> Vec<String> {
    s.references().iter().map(|p| p.hash_part().to_owned()).collect()
}

/// The cases of Nix's `src/libstore-tests/references.cc` (`TEST(references, scan)`).
#[test]
fn nix_unit_test_vectors() {
    let mut s = RefScanner::new([sp(H1)]);
    s.feed(b"foobar");
    assert!(found(&s).is_empty());

    let mut s = RefScanner::new([sp(H1)]);
    s.feed(format!("foobar{H1}xyzzy").as_bytes());
    assert_eq!(found(&s), [H1]);

    let text = format!("foobar{H1}xyzzy{H2}");
    let t = text.as_bytes();
    let mut s = RefScanner::new([sp(H1), sp(H2)]);
    for r in [0..10, 10..15, 15..20, 20..t.len()] {
        s.feed(&t[r]);
    }
    let mut want = vec![H1, H2];
    want.sort();
    assert_eq!(found(&s), want);

    let mut s = RefScanner::new([sp(H1), sp(H2)]);
    for b in t {
        s.feed(std::slice::from_ref(b));
    }
    assert_eq!(found(&s), want);
}

fn naive(data: &[u8], cands: &[String]) -> BTreeSet<String> {
    cands.iter().filter(|c| data.windows(32).any(|w| w == c.as_bytes())).cloned().collect()
}

fn arb_hash() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(ALPHABET.to_vec()), 32)
        .prop_map(|v| String::from_utf8(v).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the chunking, the scanner finds exactly what a naive search finds.
    #[test]
    fn chunking_does_not_matter(
        cands in prop::collection::vec(arb_hash(), 1..6),
        pieces in prop::collection::vec((0usize..8, prop::collection::vec(prop_oneof![
            prop::sample::select(ALPHABET.to_vec()), any::<u8>()], 0..40)), 1..12),
        cuts in prop::collection::vec(1usize..50, 1..20),
    ) {
        let mut data = Vec::new();
        for (which, filler) in &pieces {
            data.extend_from_slice(filler);
            if let Some(c) = cands.get(*which) {
                // Sometimes a truncated candidate, which must not count.
                let c = c.as_bytes();
                data.extend_from_slice(if which % 3 == 2 { &c[..31] } else { c });
            }
        }
        let want = naive(&data, &cands);
        let mut s = RefScanner::new(cands.iter().map(|h| sp(h)));
        let mut at = 0;
        for c in cuts.iter().cycle() {
            if at >= data.len() { break; }
            let end = (at + c).min(data.len());
            s.feed(&data[at..end]);
            at = end;
        }
        let got: BTreeSet<String> = found(&s).into_iter().collect();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn long_nix32_runs_and_stop_when_complete() {
    let mut data = vec![b'a'; 10_000];
    data[5000..5032].copy_from_slice(H1.as_bytes());
    let mut s = RefScanner::new([sp(H1), sp(H2)]);
    s.feed(&data);
    assert_eq!(found(&s), [H1]);
    assert!(!s.all_found());
    s.feed(H2.as_bytes());
    assert!(s.all_found());
}

#[test]
fn windows_after_rewrites() {
    // Zeroing a window: the scan resumes after it; a nix32 replacement is rescanned.
    let mut s = format!("xx{H1}{H1}yy").into_bytes();
    let mut hits = Vec::new();
    for_each_window(&mut s, |s, i| {
        if &s[i..i + 32] == H1.as_bytes() {
            hits.push(i);
            s[i..i + 32].fill(0);
        }
        1
    });
    assert_eq!(hits, [2, 34]);
    assert_eq!(&s[2..66], &[0u8; 64][..]);
}

#[test]
fn scan_references_reads_a_stream() {
    let data = format!("....{H2}....");
    let refs = scan_references(data.as_bytes(), [sp(H1), sp(H2)]).unwrap();
    assert_eq!(refs.into_iter().map(|p| p.hash_part().to_owned()).collect::<Vec<_>>(), [H2]);
}

#[test]
fn hash_and_scan_in_one_pass() {
    let data = format!("xx{H1}yy");
    let (d, refs) = hash_and_scan(data.as_bytes(), [sp(H1), sp(H2)]).unwrap();
    assert_eq!(d, crate::nar::hash_nar(data.as_bytes()).unwrap());
    assert_eq!(refs, [sp(H1)].into());
}

#[test]
fn threaded_and_sequential_agree() {
    let mut data = vec![b'x'; 3 * 256 * 1024 + 77];
    for (k, at) in [10usize, 256 * 1024 - 5, 2 * 256 * 1024 + 100].iter().enumerate() {
        let h = if k % 2 == 0 { H1 } else { H2 };
        data[*at..at + 32].copy_from_slice(h.as_bytes());
    }
    let a = hash_and_scan_threaded(&data[..], RefScanner::new([sp(H1), sp(H2)])).unwrap();
    let b = hash_and_scan_sequential(&data[..], RefScanner::new([sp(H1), sp(H2)])).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.1, [sp(H1), sp(H2)].into());
    assert_eq!(a.0.size, data.len() as u64);
}
