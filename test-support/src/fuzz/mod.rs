//! What the fuzz targets (the repository's `fuzz/` workspace) and each crate's stable
//! seed-replay test (`<crate>/tests/fuzz_seeds.rs`) share, so both run a target's body the same
//! way: [`alloc`], the counting allocator behind the heap bound, and [`replay`], the checked-in
//! seed corpora (`fuzz/seeds/<target>/`) with single-byte mutations, run under that bound.
//! The bounds themselves and the target bodies live in the crates they fuzz (`fuzzing` modules).

#[allow(unsafe_code)] // a `GlobalAlloc` is an unsafe trait; each use has its SAFETY comment
pub mod alloc;
pub mod replay;
