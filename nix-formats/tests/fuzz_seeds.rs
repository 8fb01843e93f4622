//! Runs the fuzz-target bodies (`nix_formats::fuzzing`) over the checked-in seed corpus
//! `nix-formats/fuzz/seeds/<target>/` and over a few mutations of each seed, so that the fuzz
//! logic is exercised by every stable `cargo test` (cargo-fuzz itself needs nightly).

use std::path::PathBuf;

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "empty seed corpus {}", dir.display());
    v
}

/// Each seed, plus every single-byte deletion and a few byte flips of it.
fn with_mutations(seed: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![seed.to_vec()];
    for i in (0..seed.len()).step_by(7) {
        let mut d = seed.to_vec();
        d.remove(i);
        out.push(d);
        let mut f = seed.to_vec();
        f[i] ^= 0x22;
        out.push(f);
    }
    out
}

#[test]
fn aterm_seeds() {
    let mut parsed = 0;
    for (p, bytes) in seeds("aterm") {
        assert!(
            nix_formats::derivation::Derivation::from_aterm(&bytes).is_ok(),
            "seed {} must parse",
            p.display()
        );
        parsed += 1;
        for m in with_mutations(&bytes) {
            nix_formats::fuzzing::aterm(&m);
        }
    }
    assert!(parsed >= 5);
}

#[test]
fn store_path_seeds() {
    for (_, bytes) in seeds("store_path") {
        for m in with_mutations(&bytes) {
            nix_formats::fuzzing::store_path(&m);
        }
    }
}
