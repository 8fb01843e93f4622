//! The glue of vouch's cargo-fuzz targets (`fuzz_targets/*.rs`): the counting allocator every
//! target runs under, the heap-bound check, and the real SNP samples. The target bodies live
//! in the crates they fuzz (`nix_formats::fuzzing`, `build_trace::fuzzing`,
//! `channel::fuzzing`, `host_launcher::nixproto::fuzzing`), so that each crate's stable
//! `tests/fuzz_seeds.rs` replays the seed corpora in `seeds/` with the same code and bound.
//! See `docs/fuzzing.md`.

pub mod alloc;
pub mod replay;
pub mod snp_samples;

use std::sync::OnceLock;

use build_trace::fuzzing::evidence::SnpSamples;
use nix_formats::fuzzing::AllocBound;

#[global_allocator]
static HEAP: alloc::Counting = alloc::Counting;

/// Runs `body` on `data` and panics (a libFuzzer crash) if it broke its heap bound.
pub fn run(target: &str, data: &[u8], bound: AllocBound, body: fn(&[u8])) {
    replay::run_bounded(target, data, bound, body);
}

/// The SNP samples, built (and their chains verified and cached) once per process.
pub fn snp() -> &'static SnpSamples {
    static S: OnceLock<SnpSamples> = OnceLock::new();
    S.get_or_init(snp_samples::snp_samples)
}
