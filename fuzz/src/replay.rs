//! Replaying a fuzz target's checked-in seed corpus (`fuzz/seeds/<target>/`) with the stable
//! toolchain: every seed, plus single-byte deletions and flips of it, through the target's body
//! under its heap bound. Included by each crate's `tests/fuzz_seeds.rs` through `#[path]`
//! (next to `alloc.rs`, whose allocator the test installs).

use std::path::PathBuf;

use nix_formats::fuzzing::AllocBound;

/// The seed files of `target`, sorted by name, with their bytes.
pub fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds").join(target);
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

/// `seed`, plus a deletion and a byte flip at every `step`-th position.
pub fn with_mutations(seed: &[u8], step: usize) -> Vec<Vec<u8>> {
    let mut out = vec![seed.to_vec()];
    for i in (0..seed.len()).step_by(step.max(1)) {
        let mut d = seed.to_vec();
        d.remove(i);
        out.push(d);
        let mut f = seed.to_vec();
        f[i] ^= 0x22;
        out.push(f);
    }
    out
}

/// Runs `body` on `data` and fails if it had more heap live at once than `bound` allows.
pub fn run_bounded(target: &str, data: &[u8], bound: AllocBound, body: fn(&[u8])) {
    let ((), peak) = super::alloc::measure(|| body(data));
    let limit = bound.limit(data.len());
    assert!(
        peak <= limit,
        "{target}: {peak} bytes of heap live at once for a {}-byte input (bound {limit})",
        data.len()
    );
}

/// Every seed of `target` and its mutations (a position in every `step`) through `body`.
/// Returns the number of seeds.
pub fn replay(target: &str, step: usize, bound: AllocBound, body: fn(&[u8])) -> usize {
    let seeds = seeds(target);
    for (_, bytes) in &seeds {
        for m in with_mutations(bytes, step) {
            run_bounded(target, &m, bound, body);
        }
    }
    seeds.len()
}
