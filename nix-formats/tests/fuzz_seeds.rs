//! Runs the fuzz-target bodies (`nix_formats::fuzzing`) over the checked-in seed corpus
//! `fuzz/seeds/<target>/` and over a few mutations of each seed, under each target's heap bound,
//! so that the fuzz logic is exercised by every stable `cargo test` (cargo-fuzz itself needs
//! nightly).

#[path = "../../fuzz/src/alloc.rs"]
mod alloc;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

use nix_formats::fuzzing::{self, TEXT_BOUND};

#[global_allocator]
static HEAP: alloc::Counting = alloc::Counting;

#[test]
fn aterm_seeds() {
    let mut parsed = 0;
    for (p, bytes) in replay::seeds("aterm") {
        assert!(
            nix_formats::derivation::Derivation::from_aterm(&bytes).is_ok(),
            "seed {} must parse",
            p.display()
        );
        parsed += 1;
    }
    assert!(parsed >= 5);
    replay::replay("aterm", 7, TEXT_BOUND, fuzzing::aterm);
}

#[test]
fn store_path_seeds() {
    replay::replay("store_path", 7, TEXT_BOUND, fuzzing::store_path);
}

#[test]
fn narinfo_seeds() {
    let mut parsed = 0;
    for (p, bytes) in replay::seeds("narinfo") {
        if nix_formats::narinfo::NarInfo::parse(std::str::from_utf8(&bytes).unwrap()).is_ok() {
            parsed += 1;
        } else {
            assert!(p.to_string_lossy().contains("bad-"), "seed {} must parse", p.display());
        }
    }
    assert!(parsed >= 3);
    replay::replay("narinfo", 5, TEXT_BOUND, fuzzing::narinfo);
}
