//! Fuzz target: store paths, hashes, nix32 and signatures (body: `nix_formats::fuzzing::store_path`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nix_formats::fuzzing::store_path(data));
